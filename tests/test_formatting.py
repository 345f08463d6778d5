import math

import numpy as np

from pipeline.formatting import percent


def test_percent_rounds_to_the_digits_asked_and_marks_missing_values():
    assert percent(0.8432) == "84.3"
    assert percent(0.8432, 2) == "84.32"  # the paper's LSP total, as the benchmark prints it
    assert percent(np.float32(0.25)) == "25.0"
    assert percent(1) == "100.0"
    for missing in (None, math.nan, np.float32("nan"), np.float64("nan")):
        assert percent(missing) == "-"
