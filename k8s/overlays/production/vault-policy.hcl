# Least privilege for the broker's own Vault token (role credbroker-broker).
# It manages only credbroker-* policies and token roles, mints only through
# them, and can disable entities (the kill switch) and revoke what it minted.
path "sys/policies/acl/credbroker-*" {
  capabilities = ["create", "read", "update"]
}
# (hvac reads and writes policies through the older sys/policy endpoint)
path "sys/policy/credbroker-*" {
  capabilities = ["create", "read", "update"]
}
# class roles, and each identity's own role per class (credbroker-<class>--<hash>,
# created on its first mint, deleted when its class leaves the scope map)
path "auth/token/roles/credbroker-*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "auth/token/roles" {
  capabilities = ["list"]
}
path "auth/token/create/credbroker-*" {
  capabilities = ["create", "update"]
}
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}
# freeze: every token of one identity and class in one call (its role's lease path)
path "sys/leases/revoke-prefix/auth/token/create/credbroker-*" {
  capabilities = ["update", "sudo"]
}
# crash recovery: find tokens minted before a crash (by their metadata)
path "auth/token/accessors" {
  capabilities = ["list", "sudo"]
}
# freeze: disable / re-enable a workload's entity; find it by its alias
path "identity/entity/id/*" {
  capabilities = ["update"]
}
path "identity/lookup/entity" {
  capabilities = ["update"]
}
path "sys/auth" {
  capabilities = ["read"]
}
# health: the broker checks that its own token is valid and can do all of the above
path "sys/capabilities-self" {
  capabilities = ["update"]
}
