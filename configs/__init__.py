"""Configs as code (installed as `dwjax.configs`): one `get_config(arg)` per config-driven stage
(train, spectrum, assign, report, dog; `arg` is the kernel size), overridable as
`--config.<field>=…`. convert takes its inputs (models, files) as plain flags."""
