"""The trainer: builds, trains and evaluates the federated model inside a partner container."""
