"""Learning rules, all behind the same `Method.step(x, y)`."""

from dni.methods.base import Method
from dni.methods.bprop import Backprop
from dni.methods.control import Controlled
from dni.methods.dgl import DecoupledGreedy
from dni.methods.dni import DecoupledNeuralInterfaces
from dni.methods.feedback import BackwardNetwork, DirectFeedbackAlignment, FeedbackAlignment
from dni.methods.no_bprop import NoBackprop
from dni.methods.recurrent import RecurrentDNI

__all__ = [
    "Method",
    "Backprop",
    "BackwardNetwork",
    "Controlled",
    "DecoupledGreedy",
    "DecoupledNeuralInterfaces",
    "DirectFeedbackAlignment",
    "FeedbackAlignment",
    "NoBackprop",
    "RecurrentDNI",
]
