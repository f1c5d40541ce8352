"""Learning rules, all behind the same `Method.step(x, y)`."""

from dni.methods.base import Method
from dni.methods.bprop import Backprop
from dni.methods.dni import DecoupledNeuralInterfaces

__all__ = ["Method", "Backprop", "DecoupledNeuralInterfaces"]
