"""Parameter selection: eligibility rules, GPS scoring and the `Selection` it produces."""

from sparseft.selected import Selection, SelectionError
from sparseft.selection.gps import select, top_k_per_neuron
from sparseft.selection.rules import Eligibility, parameter_roles
from sparseft.selection.scores import gradient_scores, supcon_loss

__all__ = ["Eligibility", "Selection", "SelectionError", "gradient_scores", "parameter_roles", "select",
           "supcon_loss", "top_k_per_neuron"]
