-- Runs once, on the first start of the postgres service: Prefect uses the "prefect" database
-- (POSTGRES_DB), MLflow its own.
CREATE DATABASE mlflow OWNER ganforge;
