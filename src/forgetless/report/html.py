"""``report.html``: the report's tables and plots in one self-contained page, plus a token view.

The token view shows a few training responses as the base model saw them: each response token
shaded by its perplexity (white at ppl 1, darkest at ppl ≥ ``PPL_DARKEST``) and, when a mask
is given, the tokens the mask drops from the loss struck through. Hover a token for its numbers.
Images are embedded as data URIs, so the page opens anywhere with no other files.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

from forgetless.core.labels import IGNORE_INDEX
from forgetless.lm import artifacts
from forgetless.lm.artifacts import write_text

PPL_DARKEST = 100.0


@dataclass(frozen=True)
class TokenRow:
    """One response token of the token view."""

    text: str
    ppl: float
    masked: bool


def shade(ppl: float) -> float:
    """Opacity of a token's shading: log(ppl) / log(PPL_DARKEST), clipped to [0, 1] (ppl 10 -> 0.5)."""
    if not math.isfinite(ppl) or ppl <= 1.0:
        return 0.0 if ppl <= 1.0 else 1.0
    return min(1.0, math.log(ppl) / math.log(PPL_DARKEST))


def example_tokens(input_ids: list[int], response_mask: list[int], nll: list[float], labels: list[int] | None,
                   decode) -> list[TokenRow]:
    """The response tokens of one example, with ppl = exp(nll[i]) and masked = labels[i] is ignored.

    ``nll[i]`` scores token ``i`` (the project's alignment convention); ``decode`` maps one id to text.
    """
    rows = []
    for i, (tok, in_response) in enumerate(zip(input_ids, response_mask)):
        if not in_response or nll[i] is None or math.isnan(nll[i]):
            continue
        masked = labels is not None and labels[i] == IGNORE_INDEX
        rows.append(TokenRow(decode([tok]), math.exp(nll[i]), masked))
    return rows


def token_span(row: TokenRow) -> str:
    text = html.escape(row.text).replace("\n", "↵\n") or "∅"
    opacity = shade(row.ppl)
    style = f"background: rgba(214, 39, 40, {opacity:.3f})" + ("; color: #fff" if opacity > 0.55 else "")
    title = f"ppl {row.ppl:.2f}" + (" (masked)" if row.masked else "")
    tag = "s" if row.masked else "span"
    return f'<{tag} class="tok{" masked" if row.masked else ""}" style="{style}" title="{title}">{text}</{tag}>'


def token_view(examples: dict[str, list[TokenRow]], caption: str) -> str:
    """The token view's HTML: one block per example, with its masked count."""
    parts = [f'<section id="token-view"><h2>Token view</h2><p>{html.escape(caption)}</p>']
    for example_id, rows in examples.items():
        masked = sum(r.masked for r in rows)
        parts.append(f'<div class="example"><h3>example {html.escape(str(example_id))}: {masked} of {len(rows)} '
                     f'response tokens masked</h3><pre class="tokens">{"".join(map(token_span, rows))}</pre></div>')
    parts.append("</section>")
    return "\n".join(parts)


def read_token_examples(data_file: str | Path, decode, limit: int = 3) -> dict[str, list[TokenRow]]:
    """The first ``limit`` examples of a mask stage's ``data.parquet`` (or a score stage's ``scores.parquet``)."""
    table = artifacts.read_parquet(data_file)
    has_labels = "labels" in table.column_names
    examples = {}
    for record in table.slice(0, limit).to_pylist():
        examples[str(record["id"])] = example_tokens(record["input_ids"], record["response_mask"], record["nll"],
                                                     record["labels"] if has_labels else None, decode)
    return examples


def markdown_to_html(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def embedded_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(path.stem.replace("_", " "))
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f'<figcaption>{caption}</figcaption></figure>')


STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; }
th { background: #f0f0f0; }
#verdicts { border: 2px solid #444; padding: 0.5em 1em; margin-bottom: 1em; }
#verdicts li { margin: 0.3em 0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; }
figure img, p img { max-width: min(560px, 100%); border: 1px solid #ddd; }
pre.tokens { white-space: pre-wrap; font-size: 13px; line-height: 1.6; border: 1px solid #ddd; padding: 0.5em; }
.tok { border-radius: 2px; }
s.masked { text-decoration: line-through; text-decoration-thickness: 2px; color: #555; }
"""


def inline_images(page: str, report_dir: Path) -> tuple[str, set[str]]:
    """``<img src="x.png">`` of a PNG in ``report_dir`` embedded as a data URI; returns the page and the names."""
    used = set()
    for png in sorted(report_dir.glob("*.png")):
        needle = f'src="{png.name}"'
        if needle in page:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            page = page.replace(needle, f'src="data:image/png;base64,{data}"')
            used.add(png.name)
    return page, used


def write_html(report_dir: str | Path, token_examples: dict[str, list[TokenRow]] | None = None,
               token_caption: str = "") -> Path:
    """``report_dir/report.html``: the verdicts (``verdicts.md``) first when there are any, then ``report.md`` (without
    the verdict block it opens with), ``frontier.md``, the PNG plots not shown yet, and the token view."""
    report_dir = Path(report_dir)
    body = []
    verdicts = report_dir / "verdicts.md"
    opening = verdicts.read_text(encoding="utf-8") if verdicts.is_file() else ""
    if opening:
        block, _, _ = opening.partition("\n## ")  # the verdict lines; their detail tables follow in report.md
        body.append(f'<section id="verdicts">{markdown_to_html(block)}</section>')
    for name in ("report.md", "frontier.md"):
        if (report_dir / name).is_file():
            text = (report_dir / name).read_text(encoding="utf-8")
            if opening and text.startswith(block):
                text = text[len(block):]
            body.append(markdown_to_html(text))
    page, shown = inline_images("\n".join(body), report_dir)
    images = [p for p in sorted(report_dir.glob("*.png")) if p.name not in shown]
    if images:
        page += '\n<section id="plots"><h2>Plots</h2>' + "".join(embedded_image(p) for p in images) + "</section>"
    if token_examples:
        page += "\n" + token_view(token_examples, token_caption)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>forgetless report</title>"
            f"<style>{STYLE}</style></head><body>\n" + page + "\n</body></html>\n")
    write_text(report_dir / "report.html", page)
    return report_dir / "report.html"
