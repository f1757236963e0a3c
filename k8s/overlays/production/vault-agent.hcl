# Vault/OpenBao Agent: log in with the pod's projected service-account token
# (Kubernetes auth, role credbroker-broker) and keep the token in /vault/token,
# which the broker follows (--vault-token-file).
vault {
  address = "https://vault.vault.svc:8200"
}
auto_auth {
  method "kubernetes" {
    mount_path = "auth/kubernetes"
    config = {
      role       = "credbroker-broker"
      token_path = "/var/run/secrets/vault/token"
    }
  }
  sink "file" {
    config = {
      path = "/vault/token"
      mode = 0440
    }
  }
}
