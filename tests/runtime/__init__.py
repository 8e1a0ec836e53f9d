"""Tests of moequant/runtime/. A package, so that its test modules may share names with those of another tests/
folder (tests/<folder>/test_<module>.py mirrors the library, whose module names repeat across folders)."""
