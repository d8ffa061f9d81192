"""Distributed training on Ray: actors, ``RayWorkers``, GPU placement, weight pushes.
"""
