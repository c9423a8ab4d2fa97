"""Config sections shared by every job: data, model and training.

Not a config file itself: ``train.py``, ``evaluate.py``, ``cifar_distill.py`` build on these.
"""

import ml_collections
from ml_collections import config_dict

from jaxcompress import datasets

# what the pretrained CIFAR ResNets were trained with, and the CIFARs' default normalisation
IMAGENET_MEAN, IMAGENET_STD = datasets.IMAGENET_MEAN, datasets.IMAGENET_STD


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """``(mean, std)`` the images of dataset ``name`` are normalised with when none are given
  (``data.mean``/``data.std`` left at None): the ImageNet values for the CIFARs, the dataset's own
  for mnist and fashion_mnist (:class:`jaxcompress.datasets.DatasetSpec`)."""
  spec = datasets.dataset_spec(name)
  return spec.mean, spec.std


def data_config(name: str = "cifar10") -> ml_collections.ConfigDict:
  """The ``data`` section."""
  c = ml_collections.ConfigDict()
  c.name = name  # TFDS name: cifar10, cifar100, mnist, fashion_mnist
  c.data_dir = ""  # prepared TFDS folder; "" -> $TFDS_DATA_DIR, else ~/tensorflow_datasets
  c.train_split = "train"  # TFDS split to train on
  c.eval_split = "test"  # TFDS split to report accuracy on
  c.val_examples = 0  # hold out this many training examples as a validation set (0: none)
  c.train_examples = 0  # cap on training examples, for quick runs (0: all)
  c.batch_size = 128  # global training batch, split over all devices
  c.eval_batch_size = 500  # global eval batch; the last batch is padded, never dropped
  c.augment = True  # 4-pixel zero-pad random crop + horizontal flip (see flip)
  # flip training images horizontally in augment; None: the dataset's choice (the CIFARs yes,
  # mnist and fashion_mnist no: a mirrored digit or garment is another symbol, or none)
  c.flip = config_dict.placeholder(bool)
  # per-channel mean and std of pixel/255, e.g. --config.data.mean="(0.4914, 0.4822, 0.4465)"
  # (mnist, fashion_mnist: one value, "(0.5,)"); None: the dataset's own (normalization(name)):
  # the ImageNet values for the CIFARs, (0.1307,)/(0.3081,) mnist, (0.2860,)/(0.3530,) fashion
  c.mean = config_dict.placeholder(tuple)
  c.std = config_dict.placeholder(tuple)
  return c


def model_config(name: str = "resnet20", weights: str = "") -> ml_collections.ConfigDict:
  """A model section: registry name or ``MODULE:FACTORY``, and optional weights."""
  c = ml_collections.ConfigDict()
  c.name = name  # resnet20/32/44/56/110, cnn_mnist, cnn_cifar, mlp, or MODULE:FACTORY (own model)
  c.weights = weights  # a name looked up in the weights folder (NAME.npz, NAME.msgpack, NAME/),
  #                      a path to a PyTorch .npz, flax .msgpack or orbax folder; "" -> random init
  return c


def pretrain_config() -> ml_collections.ConfigDict:
  """The ``pretrain`` section: how weights named but not found are trained first.

  The CIFAR ResNet recipe (He et al. 2016; the pretrained weights were trained this way): SGD,
  momentum 0.9, weight decay 1e-4, batch 128, crop + flip, cosine learning rate.
  """
  c = ml_collections.ConfigDict()
  c.epochs = 200.0  # 0: never train, a missing weights name is an error
  c.learning_rate = 0.1  # peak learning rate of the cosine schedule
  return c


def train_config() -> ml_collections.ConfigDict:
  """The ``train`` section (the CIFAR ResNet recipe: SGD momentum 0.9, lr 0.1, wd 1e-4)."""
  c = ml_collections.ConfigDict()
  c.epochs = 200.0  # may be fractional
  c.optimizer = "sgd"  # sgd (PyTorch-style, decay added to the gradient) or adamw
  c.learning_rate = 0.1  # peak learning rate
  c.momentum = 0.9  # sgd momentum
  c.nesterov = False  # sgd Nesterov momentum
  c.weight_decay = 1e-4  # L2 (sgd) or decoupled (adamw) weight decay
  c.schedule = "cosine"  # cosine, step or constant
  c.warmup_epochs = 0.0  # linear warmup from 0
  c.decay_at = (0.5, 0.75)  # "step" schedule: fractions of training where lr is multiplied...
  c.decay_factor = 0.1  # ...by this factor
  c.log_every_steps = 50  # metrics.jsonl and progress-bar interval
  c.checkpoint_every_steps = 500  # orbax checkpoint interval (and always at the end)
  c.eval_every_epochs = 1  # evaluate on data.eval_split every this many epochs
  c.compute_dtype = "float32"  # float32 or bfloat16: dtype of the training forward/backward;
  #                              params, optimizer state and the loss stay float32
  c.skip_nonfinite = False  # skip (and count) steps whose loss, gradient or updated
  #                           parameters are not finite instead of stopping the run
  return c


def parallel_config() -> ml_collections.ConfigDict:
  """The ``parallel`` section: joining a multi-process run (several hosts, or processes).

  Every process runs the same command with its own ``process_id``; empty fields are detected by
  ``jax.distributed.initialize`` on Cloud TPU pods and under SLURM or Open MPI (docs/training.md).
  """
  c = ml_collections.ConfigDict()
  c.distributed = False  # call jax.distributed.initialize (False: one process, its own devices)
  c.coordinator_address = ""  # HOST:PORT that process 0 serves; "" -> detected
  c.num_processes = -1  # processes in the run; -1 -> detected
  c.process_id = -1  # this process's index in [0, num_processes); -1 -> detected
  c.initialization_timeout = 300  # seconds to wait for the coordinator and every process
  return c
