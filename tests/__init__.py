"""saestore's test suite, a package so that its modules import their helpers as ``tests.helpers``
(pytest puts the repository root on ``sys.path``; the generators run as ``python -m tests.<name>``)."""
