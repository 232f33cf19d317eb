"""Shared fixtures: the simulators, each skipped with its reason where it is missing."""

import pytest

from sim.runner import simulator_unavailable_reason


def _sim_param(name):
    reason = simulator_unavailable_reason(name)
    marks = [getattr(pytest.mark, name)]
    if reason:
        marks.append(pytest.mark.skip(reason=f"{name}: {reason}"))
    return pytest.param(name, marks=marks, id=name)


SIMULATOR_PARAMS = [_sim_param("verilator"), _sim_param("icarus")]


@pytest.fixture(params=SIMULATOR_PARAMS)
def simulator(request):
    """Each test using this runs once per simulator (verilator, icarus)."""
    return request.param
