"""The stages a run can chain, in the order of the data flow. `stages=[...]` picks among them."""

from icm_lab.stages.collect import collect
from icm_lab.stages.evaluate import evaluate
from icm_lab.stages.localize import localize
from icm_lab.stages.steer import steer

STAGES = {
    "collect": collect,
    "localize": localize,
    "steer": steer,
    "evaluate": evaluate,
}
