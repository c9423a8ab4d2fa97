"""Every image job refuses weights named for another dataset than ``data.name``, in one line."""

import flax
import pytest
import tensorflow_datasets as tfds

from configs import evaluate, iterative_prune, prune_sensitivity, ptq, train
from experiments import evaluate_job, ptq_eval, sensitivity, train_job
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model
from jaxcompress.models.weights import named_dataset

JOBS = {
    "train": (train, lambda c, w: train_job.train_and_evaluate(c, w)),
    "evaluate": (evaluate, lambda c, w: evaluate_job.evaluate_config(c)),
    "ptq": (ptq, lambda c, w: ptq_eval.post_training_quantization(c)),
    "prune_sensitivity": (prune_sensitivity, lambda c, w: sensitivity.one_shot_sensitivity(c)),
    "iterative_prune": (iterative_prune, lambda c, w: sensitivity.iterative_search(c, w)),
}


def test_a_weights_name_says_its_dataset_by_its_longest_suffix():
  assert named_dataset("resnet20_cifar10") == "cifar10"
  assert named_dataset("resnet20_cifar100") == "cifar100"
  assert named_dataset("mlp_fashion_mnist") == "fashion_mnist"  # not mnist
  assert named_dataset("mlp_mnist") == "mnist"
  for unnamed in ("mlp", "resnet20_imagenet", "runs/x/resnet20_cifar10", "w_cifar10.msgpack", ""):
    assert named_dataset(unnamed) is None, unnamed


@pytest.mark.parametrize("job", sorted(JOBS))
def test_weights_of_mnist_are_refused_on_fashion_mnist(job, tmp_path, monkeypatch):
  # The two datasets share their image shape and classes: the weights would fit, and the job
  # would report a model of the other dataset's digits as a fashion classifier.
  _, variables = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
  (tmp_path / "mlp_mnist.msgpack").write_bytes(flax.serialization.to_bytes(variables))
  monkeypatch.setenv("JAXCOMPRESS_WEIGHTS_DIR", str(tmp_path))
  module, run = JOBS[job]
  config = module.get_config()
  config.model.name, config.model.weights = "mlp", "mlp_mnist"
  config.data.name = "fashion_mnist"
  config.data.mean, config.data.std = (0.5,), (0.5,)
  config.data.batch_size, config.data.eval_batch_size, config.data.val_examples = 16, 16, 0
  if job == "iterative_prune":
    config.data.val_examples = 16
  with tfds.testing.mock_data(num_examples=64):
    with pytest.raises(ConfigError, match=r"^model.weights: 'mlp_mnist' names weights for mnist, "
                       r"but data.name is 'fashion_mnist'; give weights for fashion_mnist \(a "
                       r"name such as 'mlp_fashion_mnist', or a path\)$"):
      run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
