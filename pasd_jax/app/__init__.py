"""The PASD web UI: `pasd-app` or `python -m pasd_jax.app` (README "Web UI"; needs the `ui` extra).

Modules: `cli` (arguments, launch), `service` (models loaded once; one request on `pasd-sample`'s code path),
`presets` (request settings, `pasd-sample`'s defaults, the official demo's), `tiny` (the embedded random models
served when no weights are given), `ui` (the Gradio page) and `views` (its text and CSS). Only `cli` and `ui`
import Gradio, so the service is usable and testable without it.
"""
