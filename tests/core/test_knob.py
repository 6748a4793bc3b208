"""The knob verdict (:func:`oftsr.evaluation.knob_tradeoff`): each of its checks can fail on its own."""

from __future__ import annotations

import copy

import pytest

from oftsr.evaluation import knob_tradeoff


def report(psnr, perceptual, bicubic=(38.7, 0.18), metric="st_lpips"):
    rows = [{"method": "bicubic", "t": None, "psnr": bicubic[0], metric: bicubic[1]}]
    rows += [{"method": "teacher", "t": None, "psnr": 33.0, metric: 0.08}]
    ts = [round(i / (len(psnr) - 1), 1) for i in range(len(psnr))]
    rows += [{"method": "student", "t": t, "psnr": p, metric: q} for t, p, q in zip(ts, psnr, perceptual, strict=True)]
    return {"rows": rows, "perceptual": metric, "n": 16}


GOOD = report([35.0, 34.6, 34.0, 33.1, 32.0, 31.0], [0.13, 0.12, 0.11, 0.10, 0.09, 0.085])


def failed(rep):
    return sorted(c["name"] for c in knob_tradeoff(rep)["checks"] if not c["ok"])


def test_a_curve_that_trades_fidelity_for_realism_holds():
    verdict = knob_tradeoff(GOOD)
    assert verdict["holds"] and failed(GOOD) == []
    wiggle = copy.deepcopy(GOOD)  # rises below the floors are noise
    wiggle["rows"][4]["psnr"] = wiggle["rows"][3]["psnr"] + 0.14
    wiggle["rows"][5]["st_lpips"] = wiggle["rows"][4]["st_lpips"] + 0.0045
    assert knob_tradeoff(wiggle)["holds"]


def test_a_rise_counts_only_beyond_twice_the_standard_error_of_the_paired_crops():
    rep = copy.deepcopy(GOOD)
    a, b = rep["rows"][3], rep["rows"][4]  # t = 0.2 and 0.4
    b["psnr"] = a["psnr"] + 0.4
    base = [33.0 + 0.5 * i for i in range(16)]
    a["per_crop"] = {"psnr": base}
    b["per_crop"] = {"psnr": [v + 0.4 + (1.5 if i % 2 else -1.5) for i, v in enumerate(base)]}  # +0.4 on average
    assert knob_tradeoff(rep)["holds"]  # the crops disagree: 0.4 dB is within their noise
    b["per_crop"] = {"psnr": [v + 0.4 + (0.01 if i % 2 else -0.01) for i, v in enumerate(base)]}
    assert failed(rep) == ["PSNR falls"]  # every crop rises: the same 0.4 dB is a real rise


def test_each_check_fails_on_its_own():
    # the realism end above t = 0 (and the curve rising towards it)
    assert "realism end" in failed(report([35, 34, 33, 32, 31, 30], [0.12, 0.11, 0.10, 0.11, 0.12, 0.13]))
    # the realism end above bicubic: only that check
    assert failed(report([35, 34, 33, 32, 31, 30], [0.30, 0.29, 0.28, 0.27, 0.26, 0.25])) == ["beats bicubic"]
    # the fidelity end below t = 1
    assert "fidelity end" in failed(report([30, 31, 32, 33, 34, 35], [0.13, 0.12, 0.11, 0.10, 0.09, 0.08]))
    # a dip in the middle: PSNR rises by more than the noise between neighbours
    dip = report([35.0, 33.0, 34.0, 33.0, 32.0, 31.0], [0.13, 0.12, 0.11, 0.10, 0.09, 0.08])
    assert failed(dip) == ["PSNR falls"]
    bump = report([35.0, 34.0, 33.0, 32.0, 31.0, 30.0], [0.13, 0.09, 0.11, 0.10, 0.09, 0.08])
    assert failed(bump) == ["st_lpips falls"]
    detail = next(c["detail"] for c in knob_tradeoff(bump)["checks"] if not c["ok"])
    assert "t 0.2->0.4" in detail


def test_lpips_is_the_metric_when_the_report_has_it():
    rep = report([35, 34, 33], [0.2, 0.15, 0.1], bicubic=(38.0, 0.3), metric="lpips")
    assert knob_tradeoff(rep)["holds"]
    with pytest.raises(ValueError, match="t = 0 and t = 1"):
        knob_tradeoff({"rows": rep["rows"][:3], "perceptual": "lpips"})
