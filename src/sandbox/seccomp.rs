//! A small classic-BPF seccomp filter compiler for x86_64.
//!
//! A [`Filter`] maps syscall numbers to [`Action`]s, either unconditionally or
//! through a list of argument conditions ([`ArgCond`]) tried in order with a
//! fall-through action. [`Filter::compile`] turns it into a [`Program`] whose
//! syscall lookup is a binary search (O(log n) instructions), not a linear
//! scan, and [`Program::install`] / [`install_raw`] load it into the kernel.
//!
//! # Program layout
//!
//! ```text
//!   0: ld  [arch]
//!   1: jeq #AUDIT_ARCH_X86_64, +1, +0
//!   2: ret KILL_PROCESS                  ; any other ABI (i386 via int 0x80, ...)
//!   3: ld  [nr]
//!   4: jge #0x40000000, +0, +1
//!   5: ret KILL_PROCESS                  ; x32 ABI (and any nr >= 2^30, e.g. -1)
//!   6: <tree>
//! ```
//!
//! The syscall number space `[0, 0x4000_0000)` is cut into maximal
//! *intervals* on which the outcome does not change: a run of consecutive
//! syscalls with the same unconditional action (gaps between rules take the
//! default action and merge with neighbours of the same action) is one
//! interval, and every syscall with argument conditions is an interval of its
//! own. The tree is a balanced binary search over the interval start points:
//!
//! ```text
//! node(intervals[lo..hi]), mid = (lo + hi) / 2, pivot = start(intervals[mid]):
//!     jge #pivot, +0, +len(right)        ; right subtree is at most 255 long
//!     <right = node(intervals[mid..hi])>
//!     <left  = node(intervals[lo..mid])>
//! or, when the right subtree is longer than 255 instructions (the 8-bit
//! conditional offsets cannot reach past it):
//!     jge #pivot, +1, +0
//!     ja  +len(right)                    ; BPF_JA has a 32-bit offset
//!     <right>
//!     <left>
//! ```
//!
//! A leaf is a single `ret` for an unconditional interval. For a syscall with
//! argument conditions, each branch loads the argument word, masks it (the
//! `and` is omitted for a full mask) and compares it; a failed comparison jumps
//! to the next branch (through a `ja` if farther than 255), and the last
//! instruction returns the fall-through action. Every leaf ends in `ret`, so
//! the accumulator never has to be reloaded with the syscall number after an
//! argument load, and every jump is forward and stays inside its subtree.
//!
//! A lookup costs 6 + about 2·log2(intervals) instructions plus the leaf.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;
use std::io;

/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `__X32_SYSCALL_BIT`: syscall numbers at or above this are killed.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `BPF_MAXINSNS`: the kernel rejects longer classic-BPF programs.
pub const MAX_INSNS: usize = 4096;
/// Largest errno the kernel passes through unchanged (`MAX_ERRNO`).
pub const MAX_ERRNO: u16 = 4095;

// linux/bpf_common.h opcodes.
const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_AND: u16 = 0x50;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;

// linux/seccomp.h return values.
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_DATA: u32 = 0x0000_ffff;

// Offsets into `struct seccomp_data` (little-endian x86_64).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

/// Largest forward distance a conditional jump can encode.
const MAX_COND_SKIP: usize = u8::MAX as usize;

/// What the kernel does with a matching syscall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `SECCOMP_RET_ALLOW`: run the syscall.
    Allow,
    /// `SECCOMP_RET_ERRNO`: fail the syscall with this errno (at most
    /// [`MAX_ERRNO`]) without running it.
    Errno(u16),
    /// `SECCOMP_RET_KILL_PROCESS`: kill the whole thread group with SIGSYS.
    KillProcess,
}

impl Action {
    /// The `SECCOMP_RET_*` value a filter returns for this action.
    pub const fn to_ret(self) -> u32 {
        match self {
            Action::Allow => SECCOMP_RET_ALLOW,
            Action::Errno(e) => SECCOMP_RET_ERRNO | (e as u32 & SECCOMP_RET_DATA),
            Action::KillProcess => SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// Which 32-bit half of a 64-bit syscall argument a condition looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArgHalf {
    /// Bits 0..32.
    Low,
    /// Bits 32..64.
    High,
}

/// `(half of args[arg] & mask) == value`.
///
/// Classic BPF works on 32-bit words, so a condition looks at one half of a
/// 64-bit argument. For arguments the kernel declares as `int`/`unsigned int`
/// (e.g. the `ioctl` request) the low half is all that matters; to test a
/// full 64-bit value (e.g. that a pointer is NULL) use [`ArgCond::u64_eq`],
/// which yields one condition per half.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ArgCond {
    /// Argument index, `0..=5`.
    pub arg: u8,
    /// Which half of the argument is compared.
    pub half: ArgHalf,
    /// Bits of the word that are compared.
    pub mask: u32,
    /// Expected value of the masked word.
    pub value: u32,
}

impl ArgCond {
    /// `(low 32 bits of args[arg] & mask) == value`.
    pub const fn low(arg: u8, mask: u32, value: u32) -> Self {
        ArgCond {
            arg,
            half: ArgHalf::Low,
            mask,
            value,
        }
    }

    /// `(high 32 bits of args[arg] & mask) == value`.
    pub const fn high(arg: u8, mask: u32, value: u32) -> Self {
        ArgCond {
            arg,
            half: ArgHalf::High,
            mask,
            value,
        }
    }

    /// `low 32 bits of args[arg] == value`.
    pub const fn low_eq(arg: u8, value: u32) -> Self {
        Self::low(arg, u32::MAX, value)
    }

    /// `args[arg] == value` on all 64 bits (two conditions, both required).
    pub const fn u64_eq(arg: u8, value: u64) -> [Self; 2] {
        [
            Self::low(arg, u32::MAX, value as u32),
            Self::high(arg, u32::MAX, (value >> 32) as u32),
        ]
    }

    /// Offset of the compared word in `struct seccomp_data`.
    fn offset(&self) -> u32 {
        let half = match self.half {
            ArgHalf::Low => 0,
            ArgHalf::High => 4,
        };
        OFF_ARGS + 8 * u32::from(self.arg) + half
    }

    #[cfg(test)]
    fn holds(&self, args: &[u64; 6]) -> bool {
        let full = args[usize::from(self.arg)];
        let word = match self.half {
            ArgHalf::Low => full as u32,
            ArgHalf::High => (full >> 32) as u32,
        };
        word & self.mask == self.value
    }
}

/// Why a filter cannot be compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterError {
    /// The syscall number is negative or in the x32 range (`>= 0x4000_0000`).
    InvalidSyscall(libc::c_long),
    /// An [`ArgCond`] names an argument other than `0..=5`.
    InvalidArg {
        /// Syscall of the rule.
        nr: u32,
        /// The offending argument index.
        arg: u8,
    },
    /// An [`Action::Errno`] above [`MAX_ERRNO`] (the kernel would clamp it).
    InvalidErrno(u16),
    /// Two rules for one syscall disagree: a second unconditional action, an
    /// unconditional and a conditional rule, or two conditional rules with
    /// different fall-through actions.
    ConflictingRules(u32),
    /// The program would be longer than [`MAX_INSNS`]; `len` is the length
    /// reached when the limit was crossed (a lower bound of the full length).
    TooLong {
        /// Instructions counted so far.
        len: usize,
    },
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::InvalidSyscall(nr) => write!(f, "invalid x86_64 syscall number {nr}"),
            FilterError::InvalidArg { nr, arg } => {
                write!(f, "syscall {nr}: argument index {arg} is not in 0..=5")
            }
            FilterError::InvalidErrno(e) => write!(f, "errno {e} exceeds {MAX_ERRNO}"),
            FilterError::ConflictingRules(nr) => write!(f, "conflicting rules for syscall {nr}"),
            FilterError::TooLong { len } => write!(
                f,
                "seccomp program has at least {len} instructions, more than {MAX_INSNS}"
            ),
        }
    }
}

impl std::error::Error for FilterError {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SyscallRule {
    Always(Action),
    Cond {
        branches: Vec<(Vec<ArgCond>, Action)>,
        otherwise: Action,
    },
}

/// A seccomp policy under construction: a default action and per-syscall
/// rules. Builder errors (bad numbers, conflicts) are remembered and reported
/// by [`Filter::compile`], so calls can be chained.
#[derive(Clone, Debug)]
pub struct Filter {
    default: Action,
    rules: BTreeMap<u32, SyscallRule>,
    error: Option<FilterError>,
}

/// What a run of syscall numbers does: return an action, or test arguments.
#[derive(Clone, Copy, Debug)]
enum Leaf<'a> {
    Ret(Action),
    Cond(&'a [(Vec<ArgCond>, Action)], Action),
}

fn check_nr(nr: libc::c_long) -> Result<u32, FilterError> {
    u32::try_from(nr)
        .ok()
        .filter(|n| *n < X32_SYSCALL_BIT)
        .ok_or(FilterError::InvalidSyscall(nr))
}

fn check_action(action: Action) -> Result<(), FilterError> {
    match action {
        Action::Errno(e) if e > MAX_ERRNO => Err(FilterError::InvalidErrno(e)),
        _ => Ok(()),
    }
}

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

const fn load(offset: u32) -> libc::sock_filter {
    stmt(BPF_LD | BPF_W | BPF_ABS, offset)
}

const fn ret(action: Action) -> libc::sock_filter {
    stmt(BPF_RET | BPF_K, action.to_ret())
}

/// `ja +skip`; callers bound `skip` by [`MAX_INSNS`] first.
const fn ja(skip: usize) -> libc::sock_filter {
    stmt(BPF_JMP | BPF_JA, skip as u32)
}

fn too_long(len: usize) -> Result<(), FilterError> {
    if len > MAX_INSNS {
        Err(FilterError::TooLong { len })
    } else {
        Ok(())
    }
}

impl Filter {
    /// An empty filter: every syscall gets `default`.
    pub fn new(default: Action) -> Self {
        let mut filter = Filter {
            default,
            rules: BTreeMap::new(),
            error: None,
        };
        if let Err(e) = check_action(default) {
            filter.record(e);
        }
        filter
    }

    /// The action of syscalls without a rule.
    pub fn default_action(&self) -> Action {
        self.default
    }

    fn record(&mut self, error: FilterError) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }

    /// `nr` always gets `action`. Repeating the same rule is harmless; a
    /// different rule for the same syscall is a [`FilterError::ConflictingRules`].
    pub fn rule(&mut self, nr: libc::c_long, action: Action) -> &mut Self {
        let checked = check_nr(nr).and_then(|nr| check_action(action).map(|()| nr));
        let nr = match checked {
            Ok(nr) => nr,
            Err(e) => {
                self.record(e);
                return self;
            }
        };
        match self.rules.entry(nr) {
            Entry::Vacant(slot) => {
                slot.insert(SyscallRule::Always(action));
            }
            Entry::Occupied(slot) => {
                if *slot.get() != SyscallRule::Always(action) {
                    self.record(FilterError::ConflictingRules(nr));
                }
            }
        }
        self
    }

    /// The same unconditional `action` for every syscall of `nrs`.
    pub fn rules(&mut self, nrs: &[libc::c_long], action: Action) -> &mut Self {
        for &nr in nrs {
            self.rule(nr, action);
        }
        self
    }

    /// `nr` gets `action` when all of `conds` hold. Calling this again for
    /// the same syscall appends a branch that is tried after the earlier
    /// ones; `otherwise` is the action when no branch matches and must be the
    /// same in every call for that syscall. An empty `conds` always matches.
    pub fn rule_if(
        &mut self,
        nr: libc::c_long,
        conds: Vec<ArgCond>,
        action: Action,
        otherwise: Action,
    ) -> &mut Self {
        let checked = check_nr(nr).and_then(|nr| {
            check_action(action)?;
            check_action(otherwise)?;
            match conds.iter().find(|c| c.arg > 5) {
                Some(c) => Err(FilterError::InvalidArg { nr, arg: c.arg }),
                None => Ok(nr),
            }
        });
        let nr = match checked {
            Ok(nr) => nr,
            Err(e) => {
                self.record(e);
                return self;
            }
        };
        match self.rules.entry(nr) {
            Entry::Vacant(slot) => {
                slot.insert(SyscallRule::Cond {
                    branches: vec![(conds, action)],
                    otherwise,
                });
            }
            Entry::Occupied(mut slot) => match slot.get_mut() {
                SyscallRule::Cond {
                    branches,
                    otherwise: o,
                } if *o == otherwise => {
                    branches.push((conds, action));
                }
                _ => self.record(FilterError::ConflictingRules(nr)),
            },
        }
        self
    }

    /// Reference semantics of the filter (what the compiled program must
    /// return), written as plainly as possible.
    #[cfg(test)]
    pub(crate) fn evaluate(&self, arch: u32, nr: u32, args: &[u64; 6]) -> Action {
        if arch != AUDIT_ARCH_X86_64 || nr >= X32_SYSCALL_BIT {
            return Action::KillProcess;
        }
        match self.rules.get(&nr) {
            None => self.default,
            Some(SyscallRule::Always(action)) => *action,
            Some(SyscallRule::Cond {
                branches,
                otherwise,
            }) => branches
                .iter()
                .find(|(conds, _)| conds.iter().all(|c| c.holds(args)))
                .map_or(*otherwise, |(_, action)| *action),
        }
    }

    /// Maximal intervals of `[0, X32_SYSCALL_BIT)` with one outcome each, as
    /// (first syscall number, leaf), sorted; the first starts at 0.
    fn intervals(&self) -> Vec<(u32, Leaf<'_>)> {
        fn push<'a>(out: &mut Vec<(u32, Leaf<'a>)>, start: u32, leaf: Leaf<'a>) {
            if let (Leaf::Ret(new), Some((_, Leaf::Ret(last)))) = (leaf, out.last()) {
                if new == *last {
                    return;
                }
            }
            out.push((start, leaf));
        }
        let mut out = Vec::new();
        let mut next = 0u32;
        for (&nr, rule) in &self.rules {
            if next < nr {
                push(&mut out, next, Leaf::Ret(self.default));
            }
            let leaf = match rule {
                SyscallRule::Always(action) => Leaf::Ret(*action),
                SyscallRule::Cond {
                    branches,
                    otherwise,
                } => {
                    if branches.iter().all(|(_, action)| action == otherwise) {
                        Leaf::Ret(*otherwise)
                    } else {
                        Leaf::Cond(branches, *otherwise)
                    }
                }
            };
            push(&mut out, nr, leaf);
            next = nr + 1; // nr < X32_SYSCALL_BIT: no overflow
        }
        if next < X32_SYSCALL_BIT {
            push(&mut out, next, Leaf::Ret(self.default));
        }
        out
    }

    /// Code of one leaf; ends in `ret`, all jumps stay inside.
    fn leaf_code(leaf: Leaf<'_>) -> Result<Vec<libc::sock_filter>, FilterError> {
        let (branches, otherwise) = match leaf {
            Leaf::Ret(action) => return Ok(vec![ret(action)]),
            Leaf::Cond(branches, otherwise) => (branches, otherwise),
        };
        // Built back to front (reversed), so that every jump target, which
        // lies after the jump, is already placed when the jump is emitted.
        let mut rev = vec![ret(otherwise)];
        for (conds, action) in branches.iter().rev() {
            let after_branch = rev.len();
            rev.push(ret(*action));
            for cond in conds.iter().rev() {
                too_long(rev.len() + 4)?;
                // Instructions between this jeq and the next branch.
                let skip = rev.len() - after_branch;
                if skip <= MAX_COND_SKIP {
                    rev.push(jump(BPF_JMP | BPF_JEQ | BPF_K, cond.value, 0, skip as u8));
                } else {
                    rev.push(ja(skip));
                    rev.push(jump(BPF_JMP | BPF_JEQ | BPF_K, cond.value, 1, 0));
                }
                if cond.mask != u32::MAX {
                    rev.push(stmt(BPF_ALU | BPF_AND | BPF_K, cond.mask));
                }
                rev.push(load(cond.offset()));
            }
        }
        rev.reverse();
        Ok(rev)
    }

    /// Binary search over `intervals` (non-empty, sorted), with the syscall
    /// number in the accumulator on entry.
    fn tree_code(
        &self,
        intervals: &[(u32, Leaf<'_>)],
    ) -> Result<Vec<libc::sock_filter>, FilterError> {
        let mid = intervals.len() / 2;
        let (left, right) = intervals.split_at(mid);
        let Some(&(pivot, leaf)) = right.first() else {
            return Ok(vec![ret(self.default)]); // no interval at all: unreachable
        };
        if left.is_empty() {
            return Self::leaf_code(leaf);
        }
        let right = self.tree_code(right)?;
        let left = self.tree_code(left)?;
        let len = left.len() + right.len() + 2;
        too_long(len)?;
        let mut out = Vec::with_capacity(len);
        if right.len() <= MAX_COND_SKIP {
            out.push(jump(BPF_JMP | BPF_JGE | BPF_K, pivot, 0, right.len() as u8));
        } else {
            out.push(jump(BPF_JMP | BPF_JGE | BPF_K, pivot, 1, 0));
            out.push(ja(right.len()));
        }
        out.extend(right);
        out.extend(left);
        Ok(out)
    }

    /// Compile to a classic-BPF program; see the module docs for the layout.
    pub fn compile(&self) -> Result<Program, FilterError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let intervals = self.intervals();
        // Every interval needs a `ret` and every split a `jge`.
        too_long(2 * intervals.len())?;
        let tree = self.tree_code(&intervals)?;
        let mut insns = vec![
            load(OFF_ARCH),
            jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
            ret(Action::KillProcess),
            load(OFF_NR),
            jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 0, 1),
            ret(Action::KillProcess),
        ];
        too_long(insns.len() + tree.len())?;
        insns.extend(tree);
        Ok(Program { insns })
    }
}

/// A compiled classic-BPF seccomp program (1..=[`MAX_INSNS`] instructions).
#[derive(Clone)]
pub struct Program {
    insns: Vec<libc::sock_filter>,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("len", &self.insns.len())
            .finish()
    }
}

impl Program {
    /// Number of instructions.
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    /// Always false: a compiled program has at least one instruction.
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }

    /// The instructions.
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.insns
    }

    /// A `sock_fprog` pointing into this program's (heap) instruction buffer.
    ///
    /// It borrows `self` without a lifetime: it stays valid as long as this
    /// `Program` is alive (moving the `Program` does not move the buffer).
    /// Building it allocates nothing, so it can be prepared before
    /// `fork`/`vfork`/`clone` and handed to [`install_raw`] in the child.
    pub fn as_fprog(&self) -> libc::sock_fprog {
        libc::sock_fprog {
            // compile() bounds the length by MAX_INSNS (4096), so it fits.
            len: self.insns.len() as libc::c_ushort,
            filter: self.insns.as_ptr().cast_mut(),
        }
    }

    /// Install the program on the calling thread with
    /// `seccomp(SECCOMP_SET_MODE_FILTER, 0, &fprog)`. The caller must have
    /// set `PR_SET_NO_NEW_PRIVS` (or hold `CAP_SYS_ADMIN`), otherwise the
    /// kernel answers `EACCES`. Allocates nothing.
    pub fn install(&self) -> io::Result<()> {
        let fprog = self.as_fprog();
        // SAFETY: `fprog` describes `self.insns`, which is alive and
        // unchanged for the whole call; the kernel only reads it.
        match unsafe { install_raw(&fprog) } {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, fprog)` as a raw `syscall`
/// instruction: async-signal-safe, allocates nothing and does not touch
/// `errno`, so it can run in a `CLONE_VM | CLONE_VFORK` child. Returns 0 on
/// success or the errno (e.g. `EACCES` without no_new_privs, `EINVAL` for a
/// malformed program). On hosts other than x86_64 (64-bit), where the
/// program's arch check would kill every syscall, it installs nothing and
/// returns `ENOSYS`.
///
/// # Safety
///
/// `fprog` must point to a valid `sock_fprog` whose `filter` points to `len`
/// readable instructions, both alive for the duration of the call (e.g. from
/// [`Program::as_fprog`] of a live [`Program`]).
pub unsafe fn install_raw(fprog: *const libc::sock_fprog) -> i32 {
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    {
        const SYS_SECCOMP: i64 = 317;
        const SECCOMP_SET_MODE_FILTER: u64 = 1;
        let ret: i64;
        // SAFETY: the `syscall` instruction only clobbers rax (result), rcx
        // and r11, all declared; it does not use the user stack. The kernel
        // reads `*fprog` and the instructions, which the caller guarantees
        // are valid, and writes no user memory for this call.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_SECCOMP => ret,
                in("rdi") SECCOMP_SET_MODE_FILTER,
                in("rsi") 0u64,
                in("rdx") fprog,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        if (-4095..0).contains(&ret) {
            -(ret as i32)
        } else {
            0
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_pointer_width = "64")))]
    {
        let _ = fprog;
        libc::ENOSYS
    }
}

/// Test support shared with the policy tests: a classic-BPF interpreter for
/// seccomp programs and a fork helper for real-kernel checks.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// `struct seccomp_data` as the kernel lays it out on x86_64.
    pub(crate) fn seccomp_data(arch: u32, nr: u32, args: &[u64; 6]) -> [u8; 64] {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[8..16].copy_from_slice(&0x7f00_dead_beefu64.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        data
    }

    /// The kernel's static checks that matter here (bpf_check_classic and
    /// seccomp_check_filter): length, in-range forward jumps, aligned loads
    /// inside seccomp_data, known opcodes, a final `ret`.
    pub(crate) fn check(insns: &[libc::sock_filter]) -> Result<(), String> {
        if insns.is_empty() || insns.len() > MAX_INSNS {
            return Err(format!("bad length {}", insns.len()));
        }
        for (pc, insn) in insns.iter().enumerate() {
            let target = |off: usize| {
                if pc + 1 + off < insns.len() {
                    Ok(())
                } else {
                    Err(format!("pc {pc}: jump past the end"))
                }
            };
            match insn.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    if insn.k & 3 != 0 || insn.k >= 64 {
                        return Err(format!("pc {pc}: bad load offset {}", insn.k));
                    }
                }
                c if c == BPF_ALU | BPF_AND | BPF_K || c == BPF_RET | BPF_K => {}
                c if c == BPF_JMP | BPF_JA => target(insn.k as usize)?,
                c if c == BPF_JMP | BPF_JEQ | BPF_K || c == BPF_JMP | BPF_JGE | BPF_K => {
                    target(usize::from(insn.jt))?;
                    target(usize::from(insn.jf))?;
                }
                c => return Err(format!("pc {pc}: unexpected opcode {c:#x}")),
            }
        }
        match insns.last() {
            Some(last) if last.code == BPF_RET | BPF_K => Ok(()),
            _ => Err("last instruction is not ret".into()),
        }
    }

    /// Run `insns` on a seccomp_data; returns the return value and the
    /// number of instructions executed.
    pub(crate) fn run(
        insns: &[libc::sock_filter],
        data: &[u8; 64],
    ) -> Result<(u32, usize), String> {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        let mut steps = 0usize;
        loop {
            let insn = insns
                .get(pc)
                .ok_or_else(|| format!("pc {pc} out of range"))?;
            steps += 1;
            pc += 1;
            match insn.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    let k = insn.k as usize;
                    let bytes = data
                        .get(k..k + 4)
                        .filter(|_| k & 3 == 0)
                        .ok_or_else(|| format!("bad load at {k}"))?;
                    a = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                }
                c if c == BPF_ALU | BPF_AND | BPF_K => a &= insn.k,
                c if c == BPF_RET | BPF_K => return Ok((insn.k, steps)),
                c if c == BPF_JMP | BPF_JA => pc += insn.k as usize,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += usize::from(if a == insn.k { insn.jt } else { insn.jf });
                }
                c if c == BPF_JMP | BPF_JGE | BPF_K => {
                    pc += usize::from(if a >= insn.k { insn.jt } else { insn.jf });
                }
                c => return Err(format!("unknown opcode {c:#x}")),
            }
        }
    }

    /// Inverse of [`Action::to_ret`].
    pub(crate) fn decode(ret: u32) -> Result<Action, String> {
        match ret {
            SECCOMP_RET_ALLOW => Ok(Action::Allow),
            SECCOMP_RET_KILL_PROCESS => Ok(Action::KillProcess),
            r if r & !SECCOMP_RET_DATA == SECCOMP_RET_ERRNO => Ok(Action::Errno(r as u16)),
            r => Err(format!("unexpected return value {r:#x}")),
        }
    }

    /// Action and instruction count of `program` for one syscall.
    pub(crate) fn simulate_steps(
        program: &Program,
        arch: u32,
        nr: u32,
        args: &[u64; 6],
    ) -> (Action, usize) {
        let (ret, steps) = run(program.instructions(), &seccomp_data(arch, nr, args))
            .unwrap_or_else(|e| panic!("nr {nr} args {args:x?}: {e}"));
        (
            decode(ret).unwrap_or_else(|e| panic!("nr {nr}: {e}")),
            steps,
        )
    }

    /// Action of `program` for one x86_64 syscall.
    pub(crate) fn simulate(program: &Program, nr: u32, args: &[u64; 6]) -> Action {
        simulate_steps(program, AUDIT_ARCH_X86_64, nr, args).0
    }

    /// Tiny deterministic PRNG (xorshift64*).
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random argument vectors, biased toward values that satisfy (or just
    /// miss) the filter's conditions.
    pub(crate) fn interesting_args(filter: &Filter, rng: &mut Rng, count: usize) -> Vec<[u64; 6]> {
        let mut words = vec![0u32, u32::MAX, 1, 0x8000_0000];
        for rule in filter.rules.values() {
            if let SyscallRule::Cond { branches, .. } = rule {
                for cond in branches.iter().flat_map(|(conds, _)| conds) {
                    words.push(cond.value);
                    words.push(cond.value ^ 1);
                    words.push(cond.value | (rng.next() as u32 & !cond.mask));
                    words.push(cond.value ^ cond.mask);
                }
            }
        }
        let pick = |rng: &mut Rng| -> u32 {
            if rng.below(4) == 0 {
                rng.next() as u32
            } else {
                words[rng.below(words.len() as u64) as usize]
            }
        };
        let mut out = vec![[0u64; 6]];
        while out.len() < count {
            let mut args = [0u64; 6];
            for arg in &mut args {
                let lo = pick(rng);
                let hi = if rng.below(2) == 0 { 0 } else { pick(rng) };
                *arg = (u64::from(hi) << 32) | u64::from(lo);
            }
            out.push(args);
        }
        out
    }

    /// Check `filter`'s compiled program against [`Filter::evaluate`] for
    /// every syscall 0..=max_nr (and edge numbers), `per_nr` argument vectors
    /// each. Returns the program and the most instructions one lookup ran.
    pub(crate) fn assert_equivalent(
        filter: &Filter,
        max_nr: u32,
        per_nr: usize,
        seed: u64,
    ) -> (Program, usize) {
        let program = filter.compile().expect("compile");
        check(program.instructions()).expect("kernel checks");
        let mut rng = Rng(seed | 1);
        let arg_sets = interesting_args(filter, &mut rng, per_nr);
        let edges = [
            X32_SYSCALL_BIT - 2,
            X32_SYSCALL_BIT - 1,
            X32_SYSCALL_BIT,
            X32_SYSCALL_BIT + 1,
            X32_SYSCALL_BIT | 39,
            0x7fff_ffff,
            0x8000_0000,
            u32::MAX,
        ];
        let mut max_steps = 0;
        for nr in (0..=max_nr).chain(edges) {
            for args in &arg_sets {
                for arch in [
                    AUDIT_ARCH_X86_64,
                    0x4000_0003, /* i386 */
                    0xC000_00B7, /* aarch64 */
                ] {
                    let (got, steps) = simulate_steps(&program, arch, nr, args);
                    let want = filter.evaluate(arch, nr, args);
                    assert_eq!(got, want, "arch {arch:#x} nr {nr} args {args:x?}");
                    max_steps = max_steps.max(steps);
                }
            }
        }
        (program, max_steps)
    }

    /// How a forked child ended.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum ChildEnd {
        Exited(i32),
        Signaled(i32),
    }

    /// Fork; run `child` in the child and `_exit` with its result (it must
    /// only make async-signal-safe calls: the test process has threads).
    pub(crate) fn in_child(child: impl FnOnce() -> i32) -> ChildEnd {
        // SAFETY: the child only runs `child` (raw libc calls, no allocation)
        // and then `_exit`s without returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(99);
            // SAFETY: terminates the child immediately.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid, "waitpid: {}", io::Error::last_os_error());
        if libc::WIFEXITED(status) {
            ChildEnd::Exited(libc::WEXITSTATUS(status))
        } else {
            ChildEnd::Signaled(libc::WTERMSIG(status))
        }
    }

    /// Asserts that a child run by [`in_child`] exited 0 after writing "ok" into
    /// the pipe `fds` (which this closes).
    pub(crate) fn expect_ok_from_child(end: ChildEnd, fds: [libc::c_int; 2]) {
        let mut buf = [0u8; 2];
        // SAFETY: reading into a local buffer; closing our own descriptors.
        let n = unsafe {
            libc::close(fds[1]);
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), 2);
            libc::close(fds[0]);
            n
        };
        assert_eq!(end, ChildEnd::Exited(0));
        assert_eq!((n, &buf), (2, b"ok"));
    }

    /// errno of the last failed libc call (no allocation).
    pub(crate) fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`; true on success.
    pub(crate) fn no_new_privs() -> bool {
        // SAFETY: plain prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const EPERM: Action = Action::Errno(libc::EPERM as u16);

    fn small_filter() -> Filter {
        let mut f = Filter::new(EPERM);
        f.rules(&[0, 1, 2, 3, 60, 231], Action::Allow)
            .rule(39, Action::Errno(libc::ENOSYS as u16))
            .rule(62, Action::KillProcess)
            .rule_if(16, vec![ArgCond::low_eq(1, 0x5401)], Action::Allow, EPERM)
            .rule_if(16, vec![ArgCond::low_eq(1, 0x541B)], Action::Allow, EPERM)
            .rule_if(
                56,
                vec![ArgCond::low(0, 0x0001_0000, 0x0001_0000)],
                Action::Allow,
                EPERM,
            )
            .rule_if(302, ArgCond::u64_eq(2, 0).to_vec(), Action::Allow, EPERM)
            .rule_if(
                9,
                vec![ArgCond::low(2, 0x4, 0x4), ArgCond::high(3, 0xff00, 0x0100)],
                Action::KillProcess,
                Action::Allow,
            )
            .rule_if(
                9,
                vec![ArgCond::low_eq(0, 0)],
                Action::Errno(12),
                Action::Allow,
            )
            .rule(435, Action::Errno(libc::ENOSYS as u16));
        f
    }

    #[test]
    fn small_filter_matches_reference() {
        let (program, max_steps) = assert_equivalent(&small_filter(), 600, 48, 1);
        assert!(program.len() < 100, "{}", program.len());
        assert!(max_steps < 25, "{max_steps}");
    }

    #[test]
    fn empty_filters() {
        for default in [Action::Allow, EPERM, Action::KillProcess] {
            let (program, _) = assert_equivalent(&Filter::new(default), 600, 2, 2);
            assert_eq!(program.len(), 7);
        }
    }

    #[test]
    fn denylist_style_filter_matches_reference() {
        let mut f = Filter::new(Action::Allow);
        f.rules(&[101, 155, 165, 166, 272, 308, 321, 425, 426, 427], EPERM)
            .rule_if(
                135,
                vec![ArgCond::low_eq(0, u32::MAX)],
                Action::Allow,
                EPERM,
            )
            .rule(0x3fff_ffff, Action::KillProcess)
            .rule(0, EPERM);
        assert_equivalent(&f, 600, 8, 3);
    }

    /// More than 300 rules with mixed actions: subtrees exceed 255
    /// instructions, so far jumps (BPF_JA) are needed and exercised.
    #[test]
    fn large_filter_far_jumps_match_reference() {
        let mut rng = Rng(0x1234_5678);
        let mut f = Filter::new(EPERM);
        let actions = [Action::Allow, EPERM, Action::Errno(5), Action::KillProcess];
        let mut used = std::collections::BTreeSet::new();
        while used.len() < 340 {
            let nr = rng.below(600) as u32;
            if !used.insert(nr) {
                continue;
            }
            let action = actions[rng.below(4) as usize];
            if rng.below(5) == 0 {
                let otherwise = actions[rng.below(4) as usize];
                for _ in 0..=rng.below(3) {
                    let conds = (0..rng.below(3))
                        .map(|_| {
                            let arg = rng.below(6) as u8;
                            let mask = if rng.below(2) == 0 {
                                u32::MAX
                            } else {
                                rng.next() as u32
                            };
                            let value = rng.next() as u32 & mask;
                            if rng.below(4) == 0 {
                                ArgCond::high(arg, mask, value)
                            } else {
                                ArgCond::low(arg, mask, value)
                            }
                        })
                        .collect();
                    f.rule_if(
                        i64::from(nr),
                        conds,
                        actions[rng.below(4) as usize],
                        otherwise,
                    );
                }
            } else {
                f.rule(i64::from(nr), action);
            }
        }
        let (program, max_steps) = assert_equivalent(&f, 600, 24, 4);
        let far_jumps = program
            .instructions()
            .iter()
            .filter(|i| i.code == BPF_JMP | BPF_JA && i.k > 255)
            .count();
        assert!(program.len() > 600, "{}", program.len());
        assert!(far_jumps > 0);
        // Logarithmic: 6 prologue + 2 per level (jge, ja) + the longest leaf.
        let intervals = f.intervals().len();
        let depth = usize::BITS - (intervals - 1).leading_zeros();
        assert!(
            max_steps <= 6 + 2 * depth as usize + 12,
            "{max_steps} steps, {intervals} intervals"
        );
    }

    /// A branch with 100 conditions is longer than 255 instructions: the
    /// jumps to the next branch must go through BPF_JA.
    #[test]
    fn long_condition_lists_use_far_jumps() {
        let conds: Vec<_> = (0..100u32)
            .map(|i| ArgCond::low((i % 6) as u8, 1 << (i % 32), 1 << (i % 32)))
            .collect();
        let mut f = Filter::new(EPERM);
        f.rule_if(7, conds.clone(), Action::Allow, EPERM)
            .rule_if(7, vec![ArgCond::low_eq(0, 0)], Action::KillProcess, EPERM)
            .rule(8, Action::Allow);
        let (program, _) = assert_equivalent(&f, 20, 16, 5);
        assert!(program
            .instructions()
            .iter()
            .any(|i| i.code == BPF_JMP | BPF_JA));
        // All bits set in every argument satisfies the 100 conditions.
        assert_eq!(simulate(&program, 7, &[u64::MAX; 6]), Action::Allow);
        assert_eq!(simulate(&program, 7, &[0; 6]), Action::KillProcess);
        assert_eq!(simulate(&program, 7, &[1; 6]), EPERM);
    }

    #[test]
    fn wrong_arch_and_x32_are_killed() {
        let mut f = Filter::new(Action::Allow);
        f.rule(41, EPERM);
        let program = f.compile().unwrap();
        for arch in [
            0x4000_0003u32,
            0xC000_00B7,
            0,
            u32::MAX,
            AUDIT_ARCH_X86_64 ^ 1,
        ] {
            for nr in [0, 1, 41, 39, 500] {
                let (action, _) = simulate_steps(&program, arch, nr, &[0; 6]);
                assert_eq!(action, Action::KillProcess, "arch {arch:#x}");
            }
        }
        assert_eq!(simulate(&program, 41, &[0; 6]), EPERM);
        assert_eq!(simulate(&program, 1, &[0; 6]), Action::Allow);
        for nr in [
            X32_SYSCALL_BIT,
            X32_SYSCALL_BIT | 41,
            X32_SYSCALL_BIT | 1,
            u32::MAX,
        ] {
            assert_eq!(simulate(&program, nr, &[0; 6]), Action::KillProcess);
        }
    }

    #[test]
    fn builder_errors() {
        let mut f = Filter::new(Action::Allow);
        f.rule(-1, EPERM);
        assert_eq!(f.compile().unwrap_err(), FilterError::InvalidSyscall(-1));
        let mut f = Filter::new(Action::Allow);
        f.rule(0x4000_0000, EPERM);
        assert_eq!(
            f.compile().unwrap_err(),
            FilterError::InvalidSyscall(0x4000_0000)
        );
        let mut f = Filter::new(Action::Allow);
        f.rule_if(3, vec![ArgCond::low_eq(6, 0)], EPERM, Action::Allow);
        assert_eq!(
            f.compile().unwrap_err(),
            FilterError::InvalidArg { nr: 3, arg: 6 }
        );
        let mut f = Filter::new(Action::Errno(5000));
        assert_eq!(f.compile().unwrap_err(), FilterError::InvalidErrno(5000));
        f = Filter::new(Action::Allow);
        f.rule(3, EPERM).rule(3, EPERM);
        assert!(f.compile().is_ok(), "repeating a rule is fine");
        f.rule(3, Action::Allow);
        assert_eq!(f.compile().unwrap_err(), FilterError::ConflictingRules(3));
        let mut f = Filter::new(Action::Allow);
        f.rule(4, EPERM).rule_if(4, vec![], EPERM, Action::Allow);
        assert_eq!(f.compile().unwrap_err(), FilterError::ConflictingRules(4));
        let mut f = Filter::new(Action::Allow);
        f.rule_if(4, vec![], EPERM, Action::Allow)
            .rule_if(4, vec![], EPERM, EPERM);
        assert_eq!(f.compile().unwrap_err(), FilterError::ConflictingRules(4));
        assert!(!FilterError::ConflictingRules(4).to_string().is_empty());
    }

    #[test]
    fn too_long_is_an_error() {
        // Alternating actions defeat interval merging: > 4096 instructions.
        let mut f = Filter::new(Action::Allow);
        for nr in 0..3000 {
            f.rule(nr, if nr % 2 == 0 { EPERM } else { Action::Allow });
        }
        assert!(matches!(f.compile(), Err(FilterError::TooLong { .. })));
        // Just under the limit compiles and passes the kernel checks.
        let mut f = Filter::new(Action::Allow);
        for nr in 0..2000 {
            f.rule(nr, if nr % 2 == 0 { EPERM } else { Action::Allow });
        }
        let program = f.compile().unwrap();
        assert!(program.len() <= MAX_INSNS);
        check(program.instructions()).unwrap();
        // A condition list too long for any program.
        let mut f = Filter::new(Action::Allow);
        let conds = vec![ArgCond::low(0, 1, 1); 2000];
        f.rule_if(1, conds, EPERM, Action::Allow);
        assert!(matches!(f.compile(), Err(FilterError::TooLong { .. })));
    }

    #[test]
    fn fprog_describes_the_program() {
        let program = small_filter().compile().unwrap();
        let fprog = program.as_fprog();
        assert_eq!(usize::from(fprog.len), program.len());
        assert_eq!(fprog.filter.cast_const(), program.instructions().as_ptr());
        assert!(!program.is_empty());
        assert!(format!("{program:?}").contains("len"));
    }

    /// Real kernel: EPERM for socket, everything else allowed.
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    #[test]
    fn kernel_enforces_socket_eperm() {
        let mut f = Filter::new(Action::Allow);
        f.rule(libc::SYS_socket, EPERM);
        let program = f.compile().unwrap();
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let end = in_child(|| {
            if !no_new_privs() {
                return 10;
            }
            if program.install().is_err() {
                return 11;
            }
            // SAFETY: plain syscalls with valid arguments.
            unsafe {
                if libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) != -1 {
                    return 12;
                }
                if errno() != libc::EPERM {
                    return 13;
                }
                if libc::getpid() <= 0 {
                    return 14;
                }
                if libc::write(fds[1], b"ok".as_ptr().cast(), 2) != 2 {
                    return 15;
                }
            }
            0
        });
        expect_ok_from_child(end, fds);
        // The parent is not filtered.
        // SAFETY: creating and closing a socket.
        unsafe {
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            assert!(s >= 0);
            libc::close(s);
        }
    }

    /// Real kernel, raw install path: an x32 syscall number kills the process.
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    #[test]
    fn kernel_kills_x32_syscalls() {
        let program = Filter::new(Action::Allow).compile().unwrap();
        let fprog = program.as_fprog();
        let end = in_child(|| {
            if !no_new_privs() {
                return 10;
            }
            // SAFETY: `fprog` describes `program`, alive in this child.
            if unsafe { install_raw(&fprog) } != 0 {
                return 11;
            }
            // SAFETY: x32 getpid; the filter kills us before it runs.
            unsafe { libc::syscall(i64::from(X32_SYSCALL_BIT) | libc::SYS_getpid) };
            12
        });
        assert_eq!(end, ChildEnd::Signaled(libc::SIGSYS));
    }

    /// The kernel's refusal comes back as a raw errno (EINVAL for an empty
    /// program).
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    #[test]
    fn install_raw_reports_errno() {
        let empty = libc::sock_fprog {
            len: 0,
            filter: std::ptr::null_mut(),
        };
        let end = in_child(|| {
            // SAFETY: a zero-length program is rejected before any read.
            unsafe { install_raw(&empty) }
        });
        assert_eq!(end, ChildEnd::Exited(libc::EINVAL));
    }
}
