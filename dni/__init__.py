"""dni: Decoupled Neural Interfaces with synthetic gradients, and the rules they are compared with."""

from importlib.metadata import PackageNotFoundError, version

from dni.data import ClassificationData, synthetic, vision
from dni.errors import CheckpointError, ConfigError, DataNotFoundError, Divergence, DNIError
from dni.guard import Guard
from dni.interface import DNI
from dni.lstm import LSTMNet
from dni.methods import (
    Backprop,
    BackwardNetwork,
    Controlled,
    DecoupledGreedy,
    DecoupledNeuralInterfaces,
    DirectFeedbackAlignment,
    FeedbackAlignment,
    Method,
    NoBackprop,
    RecurrentDNI,
)
from dni.models import CNN, FCN, BlockNet, CharTransformer, ResNet
from dni.splitting import split
from dni.synthesizers import (
    ConvSynthesizer,
    LinearSynthesizer,
    MLPSynthesizer,
    OracleSynthesizer,
    PositionwiseSynthesizer,
)
from dni.training import Trainer

try:
    __version__ = version("dni")
except PackageNotFoundError:  # a source checkout on the path, not installed
    __version__ = "0+unknown"

__all__ = [
    "DNI",
    "Backprop",
    "BackwardNetwork",
    "BlockNet",
    "CNN",
    "CharTransformer",
    "CheckpointError",
    "ClassificationData",
    "ConfigError",
    "Controlled",
    "ConvSynthesizer",
    "DNIError",
    "DataNotFoundError",
    "DecoupledGreedy",
    "DecoupledNeuralInterfaces",
    "DirectFeedbackAlignment",
    "Divergence",
    "FCN",
    "FeedbackAlignment",
    "Guard",
    "LSTMNet",
    "LinearSynthesizer",
    "MLPSynthesizer",
    "Method",
    "NoBackprop",
    "OracleSynthesizer",
    "PositionwiseSynthesizer",
    "RecurrentDNI",
    "ResNet",
    "Trainer",
    "__version__",
    "split",
    "synthetic",
    "vision",
]
