"""Development tools: the local demo cluster and a small TCP load balancer."""
