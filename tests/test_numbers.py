import json
import math

from hwdiff.common.numbers import json_number


def test_json_number_turns_inf_and_nan_into_null_and_leaves_the_rest_alone():
    assert [json_number(v) for v in (math.inf, -math.inf, math.nan, None)] == [None] * 4
    assert json_number(0.1) == 0.1 and json_number(-0.0) == 0.0
    assert type(json_number(3)) is int  # no conversion: an int is written as an int
    assert json.dumps([json_number(v) for v in (1e-300, math.nan, 2)]) == "[1e-300, null, 2]"
