"""The stages a run can chain, in the order of the data flow. `stages=[...]` picks among them."""

from icm_lab.stages.collect import collect

STAGES = {
    "collect": collect,
}
