"""hal0 TOML slot manifests (one file per slot).

``shape``: the ``Manifest`` and its keys; ``parse``: TOML text and files in; ``export``: a slot
out of the database and canonical TOML; ``apply``: manifests into the database.
"""
