"""report.html: token-view alignment and shading, the page's contents, and a real headless browser rendering it."""

import math
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetless.report.html import TokenRow, example_tokens, read_token_examples, shade, token_view, write_html
from forgetless.report.plots import plot_loss_curves, plot_ppl_distribution, read_loss_curve, response_ppl

NAN = float("nan")


def decode(ids):
    return f"<{ids[0]}>"


def test_shade_is_log_ppl_over_log_100_clipped():
    assert shade(1.0) == 0.0 and shade(0.5) == 0.0
    assert shade(10.0) == pytest.approx(0.5)
    assert shade(1e4) == 1.0 and shade(math.inf) == 1.0


def test_token_rows_take_the_score_stored_at_the_token_and_the_mask_from_its_label():
    # tokens 7, 8, 9 are the response; nll[i] scores token i; token 8's label is ignored -> masked
    rows = example_tokens([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], [NAN, NAN, math.log(2), math.log(4), math.log(1.5)],
                          [-100, -100, 7, -100, 9], decode)
    assert [(r.text, r.masked) for r in rows] == [("<7>", False), ("<8>", True), ("<9>", False)]
    assert [r.ppl for r in rows] == pytest.approx([2.0, 4.0, 1.5])
    unmasked = example_tokens([5, 7], [0, 1], [NAN, 0.0], None, decode)  # a scores.parquet has no labels
    assert unmasked == [TokenRow("<7>", 1.0, False)]


def test_token_view_strikes_exactly_the_masked_tokens_and_escapes_text():
    rows = [TokenRow("<b>&", 1.0, False), TokenRow("x\ny", 50.0, True), TokenRow("z", 300.0, True)]
    page = token_view({"e1": rows}, "caption")
    assert page.count('<s class="tok masked"') == 2 and page.count('<span class="tok"') == 1
    assert "&lt;b&gt;&amp;" in page and "<b>" not in page
    assert "2 of 3 response tokens masked" in page
    assert "rgba(214, 39, 40, 1.000); color: #fff" in page  # ppl 300 is past the darkest shade: white text


def write_data(path, with_labels=True):
    rows = {"id": ["a", "b"], "input_ids": [[1, 2, 3], [1, 4, 5, 6]], "response_mask": [[0, 1, 1], [0, 0, 1, 1]],
            "nll": [[NAN, math.log(3), math.log(30)], [NAN, NAN, 0.0, math.log(2)]]}
    if with_labels:
        rows["labels"] = [[-100, 2, -100], [-100, -100, 5, 6]]
    pq.write_table(pa.table(rows), path)
    return path


def test_read_token_examples_and_ppl_of_every_response_token(tmp_path):
    data = write_data(tmp_path / "data.parquet")
    examples = read_token_examples(data, decode, limit=1)
    assert list(examples) == ["a"] and [r.masked for r in examples["a"]] == [False, True]
    assert sorted(response_ppl(data)) == pytest.approx([1.0, 2.0, 3.0, 30.0])


def test_plots_skip_when_nothing_to_draw(tmp_path):
    assert plot_loss_curves({"sft": tmp_path}, tmp_path / "loss.png") is None
    (tmp_path / "loss.jsonl").write_text('{"step": 1, "nll_per_token": 2.0}\n{"step": 2, "nll_per_token": 1.5}\n')
    assert read_loss_curve(tmp_path) == ([1, 2], [2.0, 1.5])
    assert plot_loss_curves({"sft": tmp_path}, tmp_path / "loss.png").stat().st_size > 1000
    ppl = plot_ppl_distribution({"gt": write_data(tmp_path / "d.parquet")}, tmp_path / "ppl.png", [2.5, math.inf])
    assert ppl.stat().st_size > 1000


@pytest.fixture
def report_dir(tmp_path):
    (tmp_path / "report.md").write_text("# Forgetting report\n\n| run | BWT |\n|---|---|\n| sft | -0.1 |\n")
    plot_ppl_distribution({"gt": write_data(tmp_path / "d.parquet")}, tmp_path / "ppl.png")
    rows = [TokenRow(f"tok{i} ", ppl, ppl > 2.5) for i, ppl in enumerate([1.1, 40.0, 1.3, 90.0, 2.0] * 6)]
    write_html(tmp_path, {"ex": rows}, "test caption")
    return tmp_path


def test_report_html_holds_tables_images_and_token_view(report_dir):
    page = (report_dir / "report.html").read_text()
    assert "<table>" in page and "<td>sft</td>" in page
    assert page.count("data:image/png;base64,") == 1
    assert page.count('<s class="tok masked"') == 12 and "12 of 30 response tokens masked" in page


def find_browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_html_renders_in_headless_chromium(report_dir):
    browser = find_browser()
    if browser is None:
        if os.environ.get("FORGETLESS_REQUIRE_BROWSER"):
            pytest.fail("FORGETLESS_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium on this machine (CI installs Debian's)")
    from PIL import Image

    shot = report_dir / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", f"--user-data-dir={report_dir / 'profile'}", "--window-size=1000,1400",
                    f"--screenshot={shot}", (report_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)  # (H, W, 3)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    non_white = int((r + g + b < 720).sum())
    # the token view's dark-red shading of high-ppl tokens must be on screen, not just text
    red = int(((r > 150) & (g < 90) & (b < 90)).sum())
    assert non_white > 0.01 * r.size, "blank page"
    assert red > 500, f"no token shading rendered ({red} red pixels)"


WIDE_HEAD = ["run"] + [f"gen:mbpp-validation:defines-with-a-long-internal-name-{i}" for i in range(17)]


@pytest.fixture
def verdict_dir(tmp_path):
    """A report directory as the report stage writes it with verdicts: verdicts.md, then report.md opening with the
    same block, the frontier plot, and a 17-column detail table of long names."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "verdicts-small" / "verdicts.md"
    opening = fixture.read_text()
    (tmp_path / "verdicts.md").write_text(opening)
    block = opening.partition("\n## ")[0]
    table = "| " + " | ".join(WIDE_HEAD) + " |\n|" + "---|" * len(WIDE_HEAD) + "\n| sft | " + " | ".join(
        ["0.500 [0.42, 0.58] n=150"] * (len(WIDE_HEAD) - 1)) + " |\n"
    (tmp_path / "report.md").write_text(block + "\n![frontier](frontier.png)\n\n# Forgetting report\n\n" + table)
    plot_ppl_distribution({"gt": write_data(tmp_path / "d.parquet")}, tmp_path / "frontier.png")
    write_html(tmp_path)
    return tmp_path


def test_report_html_opens_with_the_verdicts_then_the_frontier_plot(verdict_dir):
    page = (verdict_dir / "report.html").read_text()
    body = page.split("<body>", 1)[1]
    assert body.lstrip().startswith('<section id="verdicts">')
    verdicts, plot, table = body.index("wins against"), body.index("data:image/png"), body.index("<table>")
    assert verdicts < plot < table
    assert body.count("stm@lr0.0003 wins against sft@lr0.0003") == 1  # the block is not repeated from report.md
    assert page.count("data:image/png;base64,") == 1 and 'id="plots"' not in page  # the one plot is shown inline


MEASURE = """<script>
const root = document.documentElement, v = document.getElementById('verdicts');
const shown = [...document.body.children].filter(e => e.offsetHeight > 0);
document.body.setAttribute('data-scroll-width', root.scrollWidth);
document.body.setAttribute('data-client-width', root.clientWidth);
document.body.setAttribute('data-first', shown[0].id);
document.body.setAttribute('data-verdicts-top', v.getBoundingClientRect().top);
</script>"""


def test_report_html_in_a_1400_px_window_overflows_nothing_and_shows_the_verdicts_first(verdict_dir):
    import re

    browser = find_browser()
    if browser is None:
        if os.environ.get("FORGETLESS_REQUIRE_BROWSER"):
            pytest.fail("FORGETLESS_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium on this machine (CI installs Debian's)")
    probe = verdict_dir / "probe.html"
    probe.write_text((verdict_dir / "report.html").read_text().replace("</body>", MEASURE + "</body>"))
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", f"--user-data-dir={verdict_dir / 'profile'}", "--window-size=1400,1000",
                           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                          check=True, capture_output=True, text=True, timeout=120)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', done.stdout.split("<body", 1)[1].split(">", 1)[0]))
    assert attrs["first"] == "verdicts"
    assert float(attrs["verdicts-top"]) < 100
    assert int(attrs["scroll-width"]) <= int(attrs["client-width"]) <= 1400, attrs
