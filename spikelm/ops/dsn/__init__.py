"""The dynamic decay spiking neuron as one op family: `dsn` (a sequence, X to spikes), `dsn_step` (one token),
`naive_dsn` (the float64 definition every backend and the step are tested against). See op.py."""
from .naive import naive_dsn
from .op import BACKENDS, DSNOutput, DSNState, dsn, dsn_step, state_dtype

__all__ = ["BACKENDS", "DSNOutput", "DSNState", "dsn", "dsn_step", "naive_dsn", "state_dtype"]
