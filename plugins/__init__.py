"""Adapters that plug healthcheck into other frameworks, each a thin layer over `healthcheck.check`
and `healthcheck.HealthMonitor`:

- `healthcheck.plugins.pytest_plugin`: `assert_healthy(model, example)` and its fixture (loaded by
  pytest through the `pytest11` entry point);
- `healthcheck.plugins.lightning`: `HealthCallback` for `lightning.pytorch.Trainer`;
- `healthcheck.plugins.huggingface`: `HealthCallback` for `transformers.Trainer`.

Lightning and transformers are optional: import a module only when you use its framework.
"""
