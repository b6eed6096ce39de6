-- The Prefect server's database next to MLflow's (POSTGRES_DB creates `mlflow`).
CREATE DATABASE prefect;
