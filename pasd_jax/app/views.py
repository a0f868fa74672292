"""The page's text: header, model notice, status and result panels, the official-demo table, and the CSS.

Plain functions from values to HTML strings, kept apart from the Gradio layout so they are tested without a server.
Everything user-supplied is escaped.
"""
from __future__ import annotations

import html

from pasd_jax.app.presets import OFFICIAL_DEMO_NOTES
from pasd_jax.app.service import Result, Session

ANS_INFO = ("ANS (paper Eq. 4) starts from the input's latent noised to this timestep instead of pure noise. "
            "Lower keeps more of the input (fidelity); higher lets the model invent more detail (perception).")

CSS = """
.gradio-container { max-width: 1360px !important; margin: 0 auto; }
#pasd-header h1 { font-size: 1.7rem; margin: 0 0 .15rem 0; }
#pasd-header p { margin: 0; opacity: .8; }
#pasd-header .badge { display: inline-block; padding: .1rem .55rem; border-radius: 999px; font-size: .8rem;
  background: var(--primary-100); color: var(--primary-700); margin-left: .4rem; vertical-align: middle; }
.pasd-notice { border-left: 4px solid #d97706; background: rgba(217, 119, 6, .08); padding: .55rem .8rem;
  border-radius: 6px; font-size: .92rem; }
.pasd-status { padding: .55rem .8rem; border-radius: 6px; font-size: .95rem; }
.pasd-status.ok { background: rgba(22, 163, 74, .09); border-left: 4px solid #16a34a; }
.pasd-status.error { background: rgba(220, 38, 38, .09); border-left: 4px solid #dc2626; color: #b91c1c; }
.pasd-status.idle { background: var(--block-background-fill); border-left: 4px solid var(--border-color-primary); }
#pasd-info table { width: 100%; border-collapse: collapse; font-size: .9rem; border: none; }
#pasd-info tr { border: none; border-bottom: 1px solid var(--border-color-primary); }
#pasd-info th, #pasd-info td { border: none !important; background: none !important; }
#pasd-info th { text-align: left; white-space: nowrap; padding: .35rem .8rem .35rem 0; vertical-align: top;
  opacity: .7; font-weight: 600; width: 8.5rem; }
#pasd-info td { padding: .35rem 0; word-break: break-word; }
#pasd-info code { font-size: .8rem; }
#pasd-run { min-height: 3rem; font-size: 1.05rem; }
.pasd-notes table { font-size: .85rem; }
"""


def header(session: Session) -> str:
    kind = "tiny random models" if session.tiny else f"PASD ({html.escape(session.loaded.variant)})"
    return ("<div id='pasd-header'><h1>PASD web UI <span class='badge'>" + kind + "</span></h1>"
            "<p>Pixel-Aware Stable Diffusion for realistic image super-resolution, in JAX. Upload an image, "
            "choose the settings, press Restore.</p></div>")


def model_notice(session: Session) -> str:
    """Says plainly when the served models are the embedded random ones."""
    if not session.tiny:
        notes = "; ".join(html.escape(n) for n in session.loaded.notes)
        return f"<div class='pasd-notice'>{notes}</div>" if notes else ""
    return ("<div class='pasd-notice'><b>These are the embedded tiny models with random weights</b>: the output "
            "shows the pipeline running end to end, not PASD's quality. Start the app with "
            "<code>--ckpt &lt;PASD checkpoint&gt; --base &lt;SD1.5&gt;</code> to serve the real models.</div>")


def status(message: str, kind: str = "idle") -> str:
    return f"<div class='pasd-status {kind}' id='pasd-status-{kind}'>{html.escape(message)}</div>"


def error(message: str) -> str:
    return status(message, "error")


def done(result: Result) -> str:
    h, w = result.image.shape[:2]
    compiled = " (including compiling the program for this size; later runs at this size reuse it)" \
        if result.compiled else ""
    return status(f"Done in {result.seconds:.1f} s{compiled}: {w}x{h} output.", "ok")


def info(result: Result, command: str) -> str:
    """The result panel: what was actually used, so the run can be repeated here or with pasd-sample."""
    h, w = result.image.shape[:2]
    rows = [
        ("Prompt used", f"<span id='pasd-used-prompt'>{html.escape(result.prompt) or '<i>(empty)</i>'}</span>"),
        ("Negative prompt", html.escape(result.negative_prompt) or "<i>(empty)</i>"),
        ("Seed", f"<span id='pasd-used-seed'>{result.seed}</span> (with the file name "
                 f"<code>{html.escape(result.name)}</code>)"),
        ("Time", f"<span id='pasd-used-time'>{result.seconds:.2f}</span> s"),
        ("Sizes", f"processed {result.processed_size[0]}x{result.processed_size[1]}, output "
                  f"<span id='pasd-output-size'>{w}x{h}</span>"),
        ("Command line", f"<code>{html.escape(command)}</code>"),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def official_notes() -> str:
    """The official demo's choices side by side with pasd-sample's, as a Markdown table."""
    lines = ["| setting | official `gradio_pasd.py` | `pasd-sample` default | the preset |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in OFFICIAL_DEMO_NOTES]
    lines.append("\nThe official demo also resizes the input before upscaling (short side to 768 / upscale); the app "
                 "uses `test_pasd.py`'s order (upscale, then short side to the process size), as `pasd-sample` does.")
    return "\n".join(lines)
