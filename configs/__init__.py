"""Configs as code: one `get_config()` per stage (ml_collections), overridable as --config.x=…"""
