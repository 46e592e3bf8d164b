import pytest

from hwdiff.calibration.schedule import SigmaSchedule
from hwdiff.errors import HwdiffError


def test_qerl_code_values_and_stages():
    schedule = SigmaSchedule(5e-2, 5e-4, 10)
    expected = [0.05, 0.0281, 0.0158, 0.00889, 0.005, 0.00281, 0.00158, 0.000889, 0.0005]
    assert len(schedule.values) == 9
    for got, want in zip(schedule.values, expected):
        assert got == pytest.approx(want, rel=1e-3)
    assert schedule.at(0, 1000) == 0.0 and schedule.at(99, 1000) == 0.0  # stage 0: no noise
    assert schedule.at(100, 1000) == pytest.approx(0.05)
    assert schedule.at(999, 1000) == pytest.approx(0.0005)
    assert schedule.at(5000, 1000) == pytest.approx(0.0005)  # past the end: the last stage


def test_other_kinds():
    assert SigmaSchedule(0.05, 0.0005, 10, "qerl-paper").values[-1] == pytest.approx(
        0.05 * 0.01 ** (8 / 9)
    )
    assert SigmaSchedule(0.04, 0.01, 5, "linear").values == pytest.approx((0.04, 0.03, 0.02, 0.01))
    assert SigmaSchedule(0.0, 0.01, 4, "constant").values == (0.01, 0.01, 0.01)
    assert SigmaSchedule(0.05, 0.0005, 10).scaled(2).sigma_end == pytest.approx(0.001)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.05, 0.0005, 2), "at least 3"),
        ((-0.05, 0.0005, 10), "finite σ ≥ 0"),
        ((0.05, 0.0, 10), "sigma_end > 0"),
        ((0.05, 0.0005, 10, "cosine"), "unknown schedule"),
    ],
)
def test_bad_schedules_are_refused(args, message):
    with pytest.raises(HwdiffError, match=message):
        SigmaSchedule(*args)
