"""fmnist: train, understand and ship a Fashion-MNIST classifier.

    import fmnist
    data = fmnist.load_dataset()                               # finds or downloads the data
    result = fmnist.train(fmnist.TrainConfig(model="notebook"), data=data)
    print(result.metrics["accuracy"], result.run_dir)
    clf = fmnist.Classifier.from_run(result.run_dir)
    clf.predict(data.test_images[:5])                          # -> ['T-shirt/top', ...]
"""

__version__ = "0.1.0"

from .data import CLASS_NAMES, FashionMNIST, describe, load_dataset  # noqa: E402
from .errors import UserError  # noqa: E402
from .evaluation import evaluate, report  # noqa: E402
from .inference import Classifier  # noqa: E402
from .metrics import compute_metrics, format_report  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .recipes import RECIPES, Recipe  # noqa: E402
from .training import TrainConfig, TrainResult, train  # noqa: E402

__all__ = [
    "CLASS_NAMES", "Classifier", "FashionMNIST", "RECIPES", "Recipe", "TrainConfig", "TrainResult", "UserError",
    "compute_metrics", "create_model", "describe", "evaluate", "format_report", "list_models",
    "load_dataset", "report", "train",
]
