"""The membershipd store: members, rooms, room members and sealed room keys.

``unibus.store.base`` holds the contract, ``unibus.store.sqlite`` the single-node
backend and ``unibus.store.kv`` the cluster backend (JetStream KV).
"""
