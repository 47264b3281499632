import math

import pytest

from vitcl.eval.metrics import average_incremental, backward_transfer, forgetting, summarize

NAN = math.nan
# after task 0: 90 on task 0; after 1: 70, 80; after 2: 60, 75, 85
ACC = [[90, NAN, NAN], [70, 80, NAN], [60, 75, 85]]


def test_average_incremental_includes_first_step():
    assert average_incremental([90, 75, 73.3]) == pytest.approx((90 + 75 + 73.3) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: best before last step = max(90, 70) = 90 -> 90 - 60 = 30; task 1: 80 - 75 = 5
    assert forgetting(ACC) == pytest.approx((30 + 5) / 2)


def test_forgetting_after_two_tasks_is_not_zero():
    # continuum's range(k-2) quirk gives 0 here; the definition gives 90 - 70
    assert forgetting([[90, NAN], [70, 80]]) == pytest.approx(20)


def test_backward_transfer():
    assert backward_transfer(ACC) == pytest.approx(((60 - 90) + (75 - 80)) / 2)


def test_single_task_has_no_forgetting():
    assert forgetting([[50]]) == 0 and backward_transfer([[50]]) == 0


def test_summarize_last_is_final_seen_accuracy():
    s = summarize(ACC, [90, 75, 73])
    assert s["last"] == 73 and s["avg_incremental"] == pytest.approx(238 / 3)
