# HashiCorp Vault server configuration for Lepton's compose mode (mounted at /vault/config/vault.hcl).
#
# NOT dev mode: data persists in integrated (raft) storage on the `vault-data` volume, and the server starts
# SEALED. After the first `docker-compose run --rm vault-init` (init + first unseal + configuration), every
# restart of the vault container needs a manual unseal (threshold of the unseal keys):
#
#   docker-compose exec vault vault operator unseal      # repeat until "Sealed false"
#
# TLS is disabled: traffic stays on the compose network and the published port binds 127.0.0.1 only. Before
# Vault is reached from another machine, configure tls_cert_file / tls_key_file here (a known gap, see README).

storage "raft" {
  # /vault/file is the image's data directory; its entrypoint makes it owned by the vault user
  path    = "/vault/file"
  node_id = "lepton-vault-1"
}

listener "tcp" {
  # all interfaces INSIDE the container (the compose network); the host publishes 127.0.0.1:8200 only
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}

api_addr     = "http://vault:8200"
cluster_addr = "http://vault:8201"

# HashiCorp recommends disabling mlock with integrated storage (raft uses memory-mapped files)
disable_mlock = true
ui            = false
