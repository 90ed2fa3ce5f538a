// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title CallBatch
/// @notice TEST-ONLY: makes several calls to one contract inside one transaction, all or nothing.
/// @dev This is what a bundler, a batching wallet or a searcher's contract does with calls it copied
///      from the public mempool: whoever sends the batch chooses what shares a transaction (and its
///      hash) with whom. The attack tests use it to put several EIP-3009 authorizations, and the
///      sender's own transfers, into a single transaction.
contract CallBatch {
    function run(address target, bytes[] calldata calls) external {
        for (uint256 i = 0; i < calls.length; i++) {
            (bool ok, ) = target.call(calls[i]);
            require(ok, "CallBatch: a call reverted");
        }
    }
}
