"""Tools that work on whole models: conversion between implementations (more to come)."""

from .convert import convert

__all__ = ["convert"]
