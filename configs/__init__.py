"""The shipped training configs (installed as `mixer_jax.configs`): `--config=<name>`."""
