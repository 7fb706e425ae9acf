"""PROTOCOL.md, schema/ and the code must say the same thing; these tests fail when they drift."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from saestore import protocol, sparse_coo
from saestore.codec import SparseCOOCodec

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_MD = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
SCHEMA = ROOT / "schema"


def _table(begin: str, end: str) -> list[list[str]]:
    body = PROTOCOL_MD.split(begin, 1)[1].split(end, 1)[0]
    rows = [r.strip() for r in body.strip().splitlines() if r.strip().startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[2:]]


def test_version_heading_and_changelog_match_code():
    assert f"**Version {protocol.PROTOCOL_VERSION}**" in PROTOCOL_MD
    assert re.search(rf"^\* \*\*{re.escape(protocol.PROTOCOL_VERSION)}\*\*", PROTOCOL_MD, re.M)


def test_variables_table_matches_code():
    rows = _table("<!-- variables:begin -->", "<!-- variables:end -->")
    documented = {r[0].strip("`"): (tuple(d.strip() for d in r[1].split(",")), r[2], r[3]) for r in rows}
    code = {v.name: v for v in protocol.VARIABLES} | {lt: protocol.sae_variable(lt) for lt in protocol.LAYER_TYPES}
    assert set(documented) == set(code)
    for name, spec in code.items():
        dims, dtype, fill = documented[name]
        assert dims == spec.dims, name
        assert dtype == spec.dtype, name
        assert ("NaN" if fill == "NaN" else json.loads(fill)) == spec.fill_value, name


def test_json_examples_are_files_in_schema_and_valid():
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", PROTOCOL_MD, re.S)]
    files = {p.name: json.loads(p.read_text()) for p in (SCHEMA / "examples").glob("*.json")}
    assert len(blocks) == len(files)
    for block in blocks:
        assert block in files.values(), f"PROTOCOL.md example not in schema/examples: {block}"
    protocol.validate_json(files["run_attributes.json"], "run_attributes")
    protocol.validate_json(files["sparse_coo.codec.json"], "sparse_coo_codec")
    assert protocol.RunAttrs.from_json(files["run_attributes.json"]).to_json() == files["run_attributes.json"]
    assert SparseCOOCodec.from_dict(files["sparse_coo.codec.json"]).to_dict() == files["sparse_coo.codec.json"]


def test_every_schema_is_valid_2020_12():
    import jsonschema

    for name in protocol.SCHEMAS:
        schema = protocol.load_schema(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("cls, pointer", [
    (protocol.RunAttrs, ()),
    (protocol.StorageInfo, ("properties", "storage")),
    (protocol.SAEInfo, ("$defs", "sae")),
])
def test_schema_parity_with_metadata_model(cls, pointer):
    schema = protocol.load_schema("run_attributes")
    for key in pointer:
        schema = schema[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(schema["properties"]) == fields
    since_12 = {"shard_docs"} if cls is protocol.StorageInfo else set()  # absent from 1.0/1.1 stores
    optional = {"run_id", "numerics"} if cls is protocol.RunAttrs else set()  # optional 1.2 additions
    assert set(schema["required"]) == fields - since_12 - optional
    if since_12:  # … and required from 1.2 on
        rule = protocol.load_schema("run_attributes")["allOf"][0]
        assert set(rule["else"]["properties"]["storage"]["required"]) == since_12


def test_enums_parity():
    schema = protocol.load_schema("run_attributes")
    assert schema["properties"]["status"]["enum"] == list(protocol.STATUSES)
    assert schema["properties"]["storage"]["properties"]["format"]["enum"] == list(protocol.STORAGE_FORMATS)
    assert schema["properties"]["storage"]["properties"]["value_dtype"]["enum"] == list(protocol.VALUE_DTYPES)
    assert schema["properties"]["saes"]["propertyNames"]["enum"] == list(protocol.LAYER_TYPES)
    assert schema["properties"]["layout"]["const"] == protocol.LAYOUT
    codec = protocol.load_schema("sparse_coo_codec")
    assert codec["properties"]["name"]["const"] == "saestore.sparse_coo"
    assert codec["properties"]["configuration"]["properties"]["value_dtype"]["enum"] == list(sparse_coo.VALUE_DTYPES)


def test_codec_header_table_matches_code():
    assert sparse_coo.HEADER_SIZE == 32
    assert "`53 43 4F 4F` (ASCII `SCOO`)" in PROTOCOL_MD and sparse_coo.MAGIC == b"SCOO"
    codes = re.search(r"value dtype code: (.*?) \|", PROTOCOL_MD).group(1)
    for name, (code, _) in sparse_coo.VALUE_DTYPES.items():
        assert f"`{code}` {name}" in codes
    assert f"format version, MUST be `{sparse_coo.FORMAT_VERSION}`" in PROTOCOL_MD
    assert "`2` if `n_cols ≤ 65536`" in PROTOCOL_MD
    assert sparse_coo.index_width(65536) == 2 and sparse_coo.index_width(65537) == 4


def test_progress_and_layout_constants_documented():
    assert f"`{protocol.PROGRESS_PATH}`" in PROTOCOL_MD
    assert "`done`" in PROTOCOL_MD and all(f"`{f}`" in PROTOCOL_MD for f in protocol.PROGRESS_FIELDS)
    rows = _table("### 2.1 Dimensions and coordinates", "Each coordinate")
    assert tuple(r[0].strip("`") for r in rows) == protocol.COORDS
    fields_table = _table("The root attribute `saestore` MUST", "Pickle and any other")
    documented = {n.strip().strip("`") for r in fields_table for n in r[0].split(",")}
    assert documented == {f.name for f in dataclasses.fields(protocol.RunAttrs)}


def test_quality_table_matches_code():
    rows = _table("<!-- quality:begin -->", "<!-- quality:end -->")
    documented = {r[0].strip("`"): (tuple(d.strip() for d in r[1].split(",")), r[2], r[3]) for r in rows}
    code = {v.name.replace("res_", "T_"): v for v in protocol.quality_variables(("res",), loss_recovered=True)}
    assert set(documented) == set(code)
    for name, spec in code.items():
        dims, dtype, fill = documented[name]
        assert (dims, dtype) == (spec.dims, spec.dtype), name
        assert fill == spec.fill_value == "NaN", name
    assert protocol.quality_name("T") in documented


def _optional_variables() -> list[protocol.VariableSpec]:
    """The §2.7 variables: those of the options other than §2.6's ``loss_recovered`` and §2.8's ``summaries``."""
    return [dataclasses.replace(v, name=v.name.replace("res_", "T_"))
            for v in protocol.run_variables(("res",), options=protocol.OPTIONS)
            if v.when is not None and v.when not in ("loss_recovered", "summaries")]


def test_optional_table_matches_code():
    """§2.7's table, the variable table's rows and the optional coordinate agree."""
    rows = _table("<!-- optional:begin -->", "<!-- optional:end -->")
    documented = {r[0].strip("`"): (tuple(d.strip() for d in r[1].split(",")), r[2], r[3], r[4].strip("`"))
                  for r in rows}
    code = {v.name: v for v in _optional_variables()}
    assert set(documented) == set(code)
    for name, v in code.items():
        dims, dtype, fill, when = documented[name]
        assert (dims, dtype, when) == (v.dims, v.dtype, v.when), name
        assert fill == json.dumps(v.fill_value), name
    assert set(protocol.OPTIONAL_COORDS.values()) <= set(protocol.OPTIONS)
    for coord, option in protocol.OPTIONAL_COORDS.items():
        assert all(coord in v.dims for v in code.values() if v.when == option), coord
    assert protocol.stored_options(["char_start", "doc_column", "logit_rank", "ce_clean", "summary"]) == protocol.OPTIONS


def test_variables_json_is_valid_and_matches_code():
    data = json.loads((SCHEMA / "variables.json").read_text(encoding="utf-8"))
    protocol.validate_json(data, "variables")
    assert data["protocol_version"] == protocol.PROTOCOL_VERSION
    listed = {v["name"]: v for v in data["variables"]}
    code = [protocol.sae_variable("T"), *protocol.VARIABLES,
            *(protocol.VariableSpec(name=v.name.replace("res_", "T_"), dims=v.dims, dtype=v.dtype,
                                    fill_value=v.fill_value, meaning=v.meaning)
              for v in protocol.quality_variables(("res",), loss_recovered=True)), *_optional_variables(),
            *(protocol.VariableSpec(name=v.name.replace("res_", "T_"), dims=v.dims, dtype=v.dtype,
                                    fill_value=v.fill_value, meaning=v.meaning)
              for v in protocol.run_variables(("res",), options=("summaries",))
                  if v.dims in (protocol.SUMMARY_DIMS, protocol.SHARD_SUMMARY_DIMS))]
    assert set(listed) == {v.name for v in code}
    for v in code:
        assert (tuple(listed[v.name]["dims"]), listed[v.name]["dtype"], listed[v.name]["fill_value"]) == \
            (v.dims, v.dtype, v.fill_value), v.name
    quality = ({v["name"] for v in data["variables"] if v["since"] != "1.0" and v.get("when") != "summaries"}
               - {v.name for v in _optional_variables()})
    documented = {r[0].strip("`") for r in _table("<!-- quality:begin -->", "<!-- quality:end -->")}
    assert quality == documented
    # §2.8: the summary variable and the summary coordinate's values, in order
    rows = _table("<!-- summaries:begin -->", "<!-- summaries:end -->")
    assert [r[0].strip("`") for r in rows] == [m["name"] for m in data["summaries"]] == list(protocol.SUMMARY_FIELDS)
    summary = listed[protocol.summary_name("T")]
    assert (tuple(summary["dims"]), summary["when"]) == (protocol.SUMMARY_DIMS, "summaries")
    shard_summary = listed[protocol.shard_summary_name("T")]
    assert (tuple(shard_summary["dims"]), shard_summary["when"], shard_summary["since"]) == \
        (protocol.SHARD_SUMMARY_DIMS, "summaries", "1.3")
    metrics = [(r[0].strip("`"), r[1]) for r in _table("<!-- metrics:begin -->", "<!-- metrics:end -->")]
    assert [m for m, _ in metrics] == [m["name"] for m in data["metrics"]] == list(protocol.QUALITY_METRICS)


def test_sharded_and_unsharded_storage_in_the_schema():
    base = json.loads((SCHEMA / "examples" / "run_attributes.json").read_text(encoding="utf-8"))
    unsharded = {**base, "storage": {k: v for k, v in base["storage"].items() if k != "shard_docs"}}
    with pytest.raises(protocol.ProtocolError, match="shard_docs"):
        protocol.validate_json(unsharded, "run_attributes")
    protocol.validate_json({**unsharded, "protocol_version": "1.1"}, "run_attributes")
    assert protocol.RunAttrs.from_json({**unsharded, "protocol_version": "1.1"}).storage.shard_docs is None
    assert protocol.StorageInfo(format="sparse", value_dtype="float32", chunk_docs=6).shard_docs == 126


# --------------------------------------------------------------------------------------------
# §4 root attributes: the version everywhere, canonical JSON and config_hash, rules from the store
# --------------------------------------------------------------------------------------------

EXAMPLES = SCHEMA / "examples"
#: the hash of schema/examples/config.json, pinned here and in PROTOCOL.md §4.1
CONFIG_VECTOR_HASH = "sha256:d127d38da0830c9b9656cbd69f57d87940653c1d16444de5d272e50135aa77fc"


def _root_fields() -> dict[str, str]:
    return {r[0]: r[1] for r in _table("The root attribute `saestore` MUST", "Pickle and any other")}


def test_root_attributes_table_and_example_name_the_current_version():
    """§4's table and example state PROTOCOL_VERSION (they say 1.2 ahead of the code's bump to 1.2)."""
    documented = re.search(r'this version: `"([0-9]+\.[0-9]+)"`', _root_fields()["`protocol_version`"]).group(1)
    example = json.loads((EXAMPLES / "run_attributes.json").read_text(encoding="utf-8"))
    assert (documented, example["protocol_version"]) == (protocol.PROTOCOL_VERSION,) * 2


def test_schema_ids_name_no_other_version():
    for name in protocol.SCHEMAS:
        schema_id = protocol.load_schema(name)["$id"]
        assert schema_id.endswith("/" + protocol.SCHEMAS[name]), schema_id
        named = re.search(r"/([0-9]+\.[0-9]+)/", schema_id)
        assert named is None or named.group(1) == protocol.PROTOCOL_VERSION, f"{name}: $id {schema_id}"
    for name in ("run_attributes", "sparse_coo_codec"):  # version-neutral: they do not change with the version
        assert not re.search(r"/[0-9]+\.[0-9]+/", protocol.load_schema(name)["$id"])


def test_example_config_hash_is_the_hash_of_its_config():
    example = json.loads((EXAMPLES / "run_attributes.json").read_text(encoding="utf-8"))
    assert protocol.config_hash(example["config"]) == example["config_hash"]


def test_canonical_json_test_vector():
    """§4.1's test vector: the config file, its canonical text in PROTOCOL.md and its pinned hash."""
    config = json.loads((EXAMPLES / "config.json").read_text(encoding="utf-8"))
    section = PROTOCOL_MD.split("### 4.1 Canonical JSON", 1)[1].split("\n## 5.", 1)[0]
    documented_text = re.search(r"has the canonical JSON\n\n```text\n(.*?)\n```", section, re.S).group(1)
    assert protocol.canonical_json(config) == documented_text
    assert protocol.config_hash(config) == CONFIG_VECTOR_HASH
    assert f"`config_hash` `{CONFIG_VECTOR_HASH}`" in section
    # what the vector pins: code-point key order (U+FF71 before U+1D4B3: UTF-16 order is the reverse),
    # nesting, raw UTF-8, the escapes, shortest-repr floats, an integral float, bool and null
    assert documented_text.index('"ｱ"') < documented_text.index('"𝒳"')
    for piece in ['"Z":0,"author":"Émile Zola"', '"big":1.5e+16', '"lr":1e-05', '"scale":2.0', '"release":null',
                  '"loss_recovered":true', r'"note":"\"quoted\"\ttab"']:
        assert piece in documented_text, piece
    assert hashlib.sha256(documented_text.encode("utf-8")).hexdigest() == CONFIG_VECTOR_HASH.removeprefix("sha256:")


def test_canonical_json_rules():
    c = protocol.canonical_json
    assert c({"b": 1, "a": {"d": [3, 1], "c": None}}) == '{"a":{"c":null,"d":[3,1]},"b":1}'
    assert c({"a": (1, 2)}) == c({"a": [1, 2]}) == '{"a":[1,2]}'
    assert c(["\u00e9", "\u65e5", "/", "\x7f"]) == '["\u00e9","\u65e5","/","\x7f"]'  # no \u escapes, / as is
    assert c(["\b\f\n\r\t\x00\x1f\"\\"]) == r'["\b\f\n\r\t\u0000\u001f\"\\"]'
    assert c([0.1, 1e-4, 1e-5, 1e15, 1e16, -0.0, 2.0, 2, True, False, -3]) == \
        "[0.1,0.0001,1e-05,1000000000000000.0,1e+16,-0.0,2.0,2,true,false,-3]"
    assert c({"Z": 1, "a": 2, "é": 3, "z": 4, "\uff71": 5, "\U0001d4b3": 6}) == \
        '{"Z":1,"a":2,"z":4,"é":3,"\uff71":5,"\U0001d4b3":6}'
    config = {"x": [1.5, None, {"y": "ü"}], "n": 7}
    assert protocol.config_hash(json.loads(json.dumps(config))) == protocol.config_hash(config)  # survives JSON
    assert protocol.config_hash({"n": 2}) != protocol.config_hash({"n": 2.0})
    for bad, match in [({"x": float("nan")}, "NaN"), ({"x": [float("inf")]}, "NaN and infinities"),
                       ({1: "a"}, "key 1 of type int"), ({"x": "\ud800"}, "lone surrogate"),
                       ({"x": {1, 2}}, "not plain JSON"), ({"x": b"a"}, "not plain JSON")]:
        with pytest.raises(protocol.ProtocolError, match=match):
            protocol.config_hash(bad)


FIXTURE_RUNS = sorted((ROOT / "tests" / "fixtures" / "runs").glob("*/*.zarr"))


def test_fixture_runs_are_found():
    """The archived runs of every protocol version are there (an empty glob would skip the next test)."""
    assert {p.parent.name for p in FIXTURE_RUNS} >= {"1.1", "1.2"}


@pytest.mark.parametrize("path", FIXTURE_RUNS, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_fixture_runs_follow_the_root_attribute_rules(path):
    """§4: config is opaque (the fixtures' has only model and seed), config_hash is its hash, and the
    cross-field rules hold against the coordinates: one SAE width (n_features), one layer list, the
    SAE variables are the keys of saes, max_docs is the largest n_docs."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = protocol.RunAttrs.from_json(dict(group.attrs)["saestore"])
    assert set(attrs.config) == {"model", "seed"}
    assert protocol.config_hash(attrs.config) == attrs.config_hash
    layers = [str(int(x)) for x in group["layer"][...]]
    assert {lt for lt in protocol.LAYER_TYPES if lt in group} == set(attrs.saes)
    for by_layer in attrs.saes.values():
        assert list(by_layer) == layers
        assert {sae.width for sae in by_layer.values()} == {group["feature"].shape[0]}
    assert group["doc"].shape[0] == int(group["n_docs"][...].max())
    assert group["res"].shape[-2:] == (group["tok"].shape[0], group["feature"].shape[0])


# --------------------------------------------------------------------------------------------
# §5: the numbers of the text are the encoder's
# --------------------------------------------------------------------------------------------

def test_documented_overflow_bounds_are_the_encoders():
    import numpy as np

    from saestore.errors import CodecEncodeError

    assert "for float16 `|x| ≥ 65520`" in PROTOCOL_MD and "for bfloat16 `|x| ≥ 2^128 − 2^119`" in PROTOCOL_MD
    assert "binary32 `0x7F7F8000`" in PROTOCOL_MD
    for value_dtype, bound in [("float16", np.float32(65520.0)), ("bfloat16", np.uint32(0x7F7F8000).view(np.float32))]:
        assert float(bound) == {"float16": 2.0**16 - 2.0**4, "bfloat16": 2.0**128 - 2.0**119}[value_dtype]
        below = np.nextafter(bound, np.float32(0))
        sparse_coo.encode_dense(np.array([below, -below], np.float32), value_dtype)
        for refused in (bound, -bound):
            with pytest.raises(CodecEncodeError, match="rounds to inf"):
                sparse_coo.encode_dense(np.array([refused], np.float32), value_dtype)


# --------------------------------------------------------------------------------------------
# §7.1 reader duties: read_attrs does what the table says
# --------------------------------------------------------------------------------------------

def _example_with(**changes) -> dict:
    example = json.loads((EXAMPLES / "run_attributes.json").read_text(encoding="utf-8"))
    return {"saestore": {**example, "protocol_version": protocol.PROTOCOL_VERSION, **changes}}


def test_reader_duties_refusals():
    import warnings

    from saestore.errors import ProtocolVersionError

    assert "### 7.1 Reader duties" in PROTOCOL_MD
    major, minor = (int(p) for p in protocol.PROTOCOL_VERSION.split("."))
    for raw, error, match in [
        ({}, protocol.ProtocolError, "not a saestore run: it has no root attribute 'saestore'"),
        ({"saestore": "run"}, protocol.ProtocolError, "not a saestore run: it has no root attribute"),
        (_example_with(layout="other.layout"), protocol.ProtocolError, "has layout 'other.layout'"),
        (_example_with(protocol_version="1"), protocol.ProtocolError, "not MAJOR.MINOR"),
        (_example_with(protocol_version=f"{major + 1}.0"), ProtocolVersionError,
         rf"protocol {major + 1}\.0.*major version {major} only"),
        (_example_with(protocol_version=f"{major - 1}.9"), ProtocolVersionError, f"protocol {major - 1}.9"),
        (_example_with(status="paused"), protocol.ProtocolError, "status"),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(error, match=match):
                protocol.read_attrs(raw)
    assert not issubclass(protocol.ProtocolError, ProtocolVersionError)


def test_reader_duties_minor_versions():
    import warnings

    major, minor = (int(p) for p in protocol.PROTOCOL_VERSION.split("."))
    with pytest.warns(UserWarning, match=f"protocol {major}.{minor + 1}, newer than"):
        attrs = protocol.read_attrs(_example_with(protocol_version=f"{major}.{minor + 1}", new_field={"x": 1}))
    assert attrs.protocol_version == f"{major}.{minor + 1}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # older and equal minors read without a warning
        for m in range(minor + 1):
            assert protocol.read_attrs(_example_with(protocol_version=f"{major}.{m}")).protocol_version == f"{major}.{m}"
        for status in protocol.STATUSES:  # every status opens; §7.1 says what each means
            assert protocol.read_attrs(_example_with(status=status)).status == status
