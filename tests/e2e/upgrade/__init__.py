"""A rolling upgrade's two releases (tests/e2e/test_rolling_upgrade.py): ``old`` knows ``Rated`` v1, ``new`` adds v2.

Worker processes load one release or the other; the test process loads only the events of the new one.
"""
