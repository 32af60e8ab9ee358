"""opdlab.models"""
