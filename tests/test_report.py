"""The run's plots and per-stage table: every paired layer drawn, titles inside the figure, global-step curves."""
import pytest

from semalign_ds.evaluation import report


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    box, page = artist.get_window_extent(), fig.bbox
    return box.x0 >= page.x0 and box.x1 <= page.x1 and box.y0 >= page.y0 and box.y1 <= page.y1


def test_attribution_draws_every_paired_layer_even_at_zero(tmp_path):
    scores = [0.3, 0.5, 0.0, 0.2, 0.0, 0.0]
    sources = [2, 3, (4, 5, 0.5)]  # student 3 interpolates teacher layers 4 and 5
    fig = report.attribution_figure(scores, sources)
    ax = fig.axes[0]
    hatched = {round(p.get_x() + p.get_width() / 2) for p in ax.patches if p.get_hatch()}
    assert hatched == {2, 3, 4, 5}
    markers = {round(line.get_xdata()[0]) for line in ax.lines if line.get_marker() == "^"}
    assert markers == {3, 5}  # the paired layers whose bars are too small to see
    labels = {t.get_text() for t in ax.texts}
    assert {"S1", "S2 (~0)", "S3", "S3 (~0)"} <= labels
    assert _inside(fig, ax.title)
    assert report.attribution_chart(scores, sources, tmp_path / "a.png").stat().st_size > 0


def _history(stages=3, steps=4):
    rows, step = [], 0
    for stage in range(1, stages + 1):
        for i in range(steps):
            step += 1
            rows.append({"step": step, "stage": stage, "loss": 3.0 - 0.1 * step, "layer_loss": 1.0 / (i + 1),
                         "out_loss": None if i == 0 else 2.0, "tokens_per_s": 100.0 * stage})
    return rows


def test_loss_curves_run_on_the_global_step_with_stage_boundaries(tmp_path):
    fig = report.loss_figure(_history())
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss", "layer_loss", "out_loss"]
    for ax in panels:
        assert list(ax.lines[0].get_xdata())[-1] == 12 and list(ax.lines[0].get_xdata())[0] in (1, 2)
        boundaries = sorted(line.get_xdata()[0] for line in ax.lines[1:])
        assert boundaries == [4.5, 8.5]
        assert [t.get_text().strip() for t in ax.texts] == ["stage 1", "stage 2", "stage 3"]
    width, height = fig.get_size_inches()
    assert width / height < 2.5  # a readable panel grid, not a strip
    assert report.loss_curves(_history(), tmp_path / "l.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no loss values"):
        report.loss_figure([])


def test_stage_table_has_a_row_per_stage():
    lines = report.stage_table(_history()).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [r["stage"] for r in rows] == ["1", "2", "3"]
    assert [r["steps"] for r in rows] == ["1-4", "5-8", "9-12"]
    assert rows[1]["loss first"] == "2.5" and rows[1]["loss last"] == "2.2"
    assert rows[0]["out_loss first"] == "2"  # the None of the stage's first step is skipped
    assert rows[2]["tokens/s"] == "300"
