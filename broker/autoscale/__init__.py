"""Autoscaler of provider worker pools (issue 18): pure decisions, observation, supervision."""
