"""Where the default local tracking store lives, next to the output directory: the SQLite file and
the artifact folder (names shared by :mod:`catsdogs.tracking` and its MLflow tracker)."""

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
