"""Tools that work on whole models: conversion between implementations, freezing."""

from .convert import convert
from .freeze import freeze, unfreeze

__all__ = ["convert", "freeze", "unfreeze"]
