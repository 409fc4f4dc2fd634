"""Backends: one subpackage per framework behind the protocols in :mod:`.base`; choice and
construction in :mod:`.select`."""
