"""Models: CIFAR ResNets, small CNNs and an MLP, a registry by name, PyTorch weight import."""

from jaxcompress.models.cnn import MLP, CifarCNN, MnistCNN
from jaxcompress.models.registry import create_model, get_model, model_names
from jaxcompress.models.resnet import CifarResNet
from jaxcompress.models.torch_import import load_pytorch_npz, torch_to_flax

__all__ = ["CifarResNet", "MnistCNN", "CifarCNN", "MLP", "get_model", "model_names",
           "create_model", "load_pytorch_npz", "torch_to_flax"]
