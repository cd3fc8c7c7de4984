"""The reproduction scorecard: the verdict rule, claims from synthetic tables, the chart."""

import pandas as pd
import pytest

from privbench.report import pages, scorecard
from privbench.report.pages import Spread
from privbench.studies.throughput import report as throughput_report
from privbench.studies.torch_cifar import report as torch_report


def spread(low: float, high: float, n: int = 3) -> Spread:
    return Spread((low + high) / 2, low, high, n)


def test_verdict_rule_widens_the_range_by_the_tolerance():
    assert scorecard.TOLERANCE == pytest.approx(0.20)  # sqrt(2) x the 14% cross-machine variation
    inside = scorecard.Claim("c", 0.5, spread(0.45, 0.55))
    widened = scorecard.Claim("c", 0.55 * 1.19, spread(0.45, 0.55))
    beyond = scorecard.Claim("c", 0.55 * 1.21, spread(0.45, 0.55))
    below = scorecard.Claim("c", 0.45 / 1.21, spread(0.45, 0.55))
    assert [c.verdict for c in (inside, widened, beyond, below)] == ["consistent", "consistent", "differs", "differs"]
    assert inside.reason == ""


def test_no_verdict_without_a_comparable_setting_or_enough_processes():
    differs = scorecard.differences(("batch", 16, 32), ("model size", "small", "small"), "published on a GPU")
    assert differs == "batch 16 (published: 32); published on a GPU"
    claims = [scorecard.Claim("c", 0.5, spread(0.5, 0.5), differs),
              scorecard.Claim("c", 0.5, Spread(None, None, None, 0)),
              scorecard.Claim("c", 0.5, spread(0.5, 0.5, n=2)),
              scorecard.Claim("c", 0.5, Spread(0.5, 0.5, 0.5, 1))]
    assert {c.verdict for c in claims} == {"not comparable"}
    assert [c.reason for c in claims] == [differs, "not measured by this preset", "2 processes, fewer than 3",
                                          "1 process, fewer than 3"]
    table = scorecard.table(claims)
    assert "| 4 | c | 0.50x | 0.50x (n=1, spread unknown) | not comparable: 1 process, fewer than 3 |" in table
    assert "| 2 | c | 0.50x | - | not comparable: not measured by this preset |" in table
    assert scorecard.differences(("batch", None, 32), "") == ""  # nothing measured: nothing to compare


def test_pick_batch_prefers_the_published_batch():
    assert scorecard.pick_batch({8, 16, 32}, 32) == 32
    assert scorecard.pick_batch({8, 16}, 32) == 16
    assert scorecard.pick_batch(set(), 32) is None


def _throughput_runs(ratios: list[float], batch: int = 32) -> pd.DataFrame:
    """Torch CNN small, standard and clipped at batches 8 and ``batch``, one process per ratio at ``batch``."""
    rows = []
    for repeat, ratio in enumerate(ratios):
        for mode, sps in (("standard", 100.0 + repeat), ("clipped", (100.0 + repeat) * ratio)):
            rows.append({"framework": "torch", "model": "cnn", "size": "small", "mode": mode, "batch_size": batch,
                         "status": "ok", "throughput_sps": sps, "repeat": repeat})
    rows += [{"framework": "torch", "model": "cnn", "size": "small", "mode": mode, "batch_size": 8, "status": "ok",
              "throughput_sps": 50.0, "repeat": 0} for mode in ("standard", "clipped")]
    return pd.DataFrame(rows)


def test_throughput_claims_pair_the_repeats_of_the_published_batch():
    config = {"throughput": {"sizes": ["small"]}}
    published = pages.published("benchmark_results")
    cnn = published["opacus_small_batch32"]["cnn"]
    claims = throughput_report.claims(config, _throughput_runs([0.17, 0.19, 0.18]), published)
    assert len(claims) == len(published["opacus_small_batch32"])
    claim = claims[0]
    assert claim.published == pytest.approx(cnn["clipped"] / cnn["standard"])
    assert claim.reproduced == pytest.approx(Spread(0.18, 0.17, 0.19, 3))
    assert (claim.setting_differs, claim.verdict) == ("", "consistent")
    assert [c.reason for c in claims[1:]] == ["not measured by this preset"] * 2
    row = scorecard.table(claims).splitlines()[2]
    assert row == ("| 1 | CNN small, batch 32: PyTorch clipped (Opacus) / standard throughput | 0.18x | "
                   "0.18x (0.17-0.19, n=3) | consistent |")
    far = throughput_report.claims(config, _throughput_runs([0.5, 0.52, 0.51]), published)[0]
    assert far.verdict == "differs"
    # the published batch never ran in both modes: the largest that did, marked not comparable
    other = throughput_report.claims(config, _throughput_runs([0.18] * 3, batch=16), published)[0]
    assert other.reproduced.median == pytest.approx(0.18)
    assert (other.verdict, other.reason) == ("not comparable", "batch 16 (published: 32)")


def test_torch_claims_name_the_batches_they_compare():
    rows = [{"configuration": name, "batch_size": batch, "status": "ok", "seconds_per_epoch": seconds, "repeat": r}
            for r in range(3) for name, batch, seconds in (("baseline", 64, 100.0), ("opacus", 16, 1800.0 + r))]
    claims = torch_report.claims({"platform": "cpu"}, pd.DataFrame(rows), pages.published("torch_benchmarks"))
    opacus = next(c for c in claims if c.name.startswith("PyTorch + Opacus:"))
    assert opacus.published == pytest.approx(6787.58 / 374.89)
    assert opacus.reproduced == pytest.approx(Spread(18.01, 18.0, 18.02, 3))
    assert opacus.reason == "batch 16 against 64 (published: 16 against 512)"


@pytest.mark.parametrize("published", [0.5, 20.0])  # a span within 10x (linear axes) and beyond it (log)
def test_the_chart_is_written(tmp_path, published):
    claims = [scorecard.Claim("a", published, spread(0.4, 0.6)), scorecard.Claim("b", 1.0, spread(0.9, 1.1, n=1)),
              scorecard.Claim("c", 2.0, Spread(None, None, None, 0))]
    path = tmp_path / "scorecard.png"
    scorecard.chart(claims, "title", "a machine", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty.png"
    scorecard.chart(claims[2:], "title", "a machine", empty)
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
