"""hal0 TOML slot manifests: parse, export, apply."""
