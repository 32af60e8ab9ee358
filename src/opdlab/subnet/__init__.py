"""opdlab.subnet"""
