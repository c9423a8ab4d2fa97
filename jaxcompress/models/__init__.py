"""Models: any Linen or NNX module as pure functions (:mod:`.functional`), a registry by name or
``MODULE:FACTORY``, weights from PyTorch ``.npz``, flax ``.msgpack`` or orbax checkpoints, and the
built-in test bench: CIFAR ResNets, small CNNs, an MLP, and character-level language models (a
GPT and an LSTM)."""

from jaxcompress.models.cnn import MLP, CifarCNN, MnistCNN
from jaxcompress.models.functional import Functional, functional, set_variables, variables_of
from jaxcompress.models.gpt import CharGPT
from jaxcompress.models.lstm import CharLSTM
from jaxcompress.models.registry import create_model, get_model, model_names, register
from jaxcompress.models.resnet import CifarResNet
from jaxcompress.models.torch_import import load_pytorch_npz, torch_to_flax
from jaxcompress.models.weights import load_weights

__all__ = ["Functional", "functional", "set_variables", "variables_of", "CifarResNet", "MnistCNN",
           "CifarCNN", "MLP", "CharGPT", "CharLSTM", "get_model", "model_names", "register",
           "create_model", "load_weights", "load_pytorch_npz", "torch_to_flax"]
