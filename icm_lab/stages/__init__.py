"""The stages a run can chain, in the order of the data flow. `stages=[...]` picks among them."""

from icm_lab.stages.collect import collect
from icm_lab.stages.localize import localize

STAGES = {
    "collect": collect,
    "localize": localize,
}
