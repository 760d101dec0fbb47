"""Configs as code (installed as `dwjax.configs`): one `get_config()` per stage (ml_collections),
overridable as --config.x=…"""
