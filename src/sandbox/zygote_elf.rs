//! Which binaries may be zygote templates (`crate::udf_runner::zygote`).
//!
//! A template holds the seccomp gate's key while the dynamic loader prepares it,
//! so no code of the (untrusted) binary may run before the shim's constructor.
//! The loader runs the executable's own code before `main` in these ways, and a
//! binary that uses any of them is refused:
//! * `DT_PREINIT_ARRAY` (run by the loader before every library constructor);
//! * IFUNC resolvers: an `R_X86_64_IRELATIVE` relocation, or any relocation or
//!   exported symbol naming a defined `STT_GNU_IFUNC` symbol;
//! * interposition: a library constructor that calls, say, `malloc` runs the
//!   executable's `malloc` if the executable exports one. So every symbol the
//!   executable defines in its dynamic symbol table must be `_IO_stdin_used` or a
//!   data object inside data copied from a library (the target of one of its own
//!   `R_X86_64_COPY` relocations, like `stderr`, or `environ` beside
//!   `__environ`), and no loadable segment may be both writable and executable
//!   (so copied data can never be run as code);
//! * audit libraries (`DT_AUDIT`, `DT_DEPAUDIT`).
//!
//! The executable's `DT_INIT`/`DT_INIT_ARRAY` run from `__libc_start_main`, so in
//! each child, after the fork, and are allowed. The binary must be dynamically
//! linked against glibc's x86-64 loader (`PT_INTERP` = [`GLIBC_LOADER`]), which is
//! what honours `LD_PRELOAD` as the shim expects.
//!
//! Libraries are not checked: they come from the worker root (the runner's
//! library mounts), which a zygote load trusts with the key (documented on
//! `LoadOptions::zygote`).

/// The only accepted `PT_INTERP`.
pub const GLIBC_LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;

const DT_NULL: u64 = 0;
const DT_PLTRELSZ: u64 = 2;
const DT_HASH: u64 = 4;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_SYMENT: u64 = 11;
const DT_REL: u64 = 17;
const DT_PLTREL: u64 = 20;
const DT_JMPREL: u64 = 23;
const DT_PREINIT_ARRAY: u64 = 32;
const DT_PREINIT_ARRAYSZ: u64 = 33;
const DT_GNU_HASH: u64 = 0x6fff_fef5;
const DT_DEPAUDIT: u64 = 0x6fff_fefb;
const DT_AUDIT: u64 = 0x6fff_fefc;

const R_X86_64_COPY: u32 = 5;
const R_X86_64_IRELATIVE: u32 = 37;
const STT_OBJECT: u8 = 1;
const STT_GNU_IFUNC: u8 = 10;
const SYM_SIZE: u64 = 24;
const RELA_SIZE: u64 = 24;

/// A symbol table this large is not a UDF's.
const MAX_SYMBOLS: u64 = 1 << 20;

struct Elf<'a> {
    bytes: &'a [u8],
    loads: Vec<(u64, u64, u64)>,
}

impl Elf<'_> {
    fn u16(&self, off: u64) -> Result<u16, String> {
        self.slice(off, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&self, off: u64) -> Result<u32, String> {
        self.slice(off, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, off: u64) -> Result<u64, String> {
        self.slice(off, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    fn slice(&self, off: u64, len: u64) -> Result<&[u8], String> {
        let end = off.checked_add(len).ok_or("offset overflow")?;
        self.bytes.get(off as usize..end as usize).ok_or_else(|| format!("truncated ELF file (needs bytes {off}..{end})"))
    }

    /// File offset of virtual address `addr` (inside a PT_LOAD's file image).
    fn offset(&self, addr: u64) -> Result<u64, String> {
        self.loads
            .iter()
            .find(|(vaddr, filesz, _)| addr >= *vaddr && addr - vaddr < *filesz)
            .map(|(vaddr, _, off)| off + (addr - vaddr))
            .ok_or_else(|| format!("address {addr:#x} is outside the file's loaded segments"))
    }

    fn sym_info(&self, symtab: u64, index: u64) -> Result<(u8, u16, String), String> {
        let at = symtab + index * SYM_SIZE;
        let info = self.slice(at + 4, 1)?[0];
        let shndx = self.u16(at + 6)?;
        let name = self.u32(at)?;
        Ok((info, shndx, format!("#{index} (name offset {name})")))
    }
}

/// Checks that `bytes` (an ELF executable) may be a zygote template; the error
/// says which rule it breaks.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let mut elf = Elf { bytes, loads: Vec::new() };
    if elf.u16(18)? != 62 {
        return Err("not an x86-64 binary".into());
    }
    let phoff = elf.u64(32)?;
    let phentsize = u64::from(elf.u16(54)?);
    let phnum = u64::from(elf.u16(56)?);
    if phentsize < 56 {
        return Err("bad program header size".into());
    }
    let (mut interp, mut dynamic) = (None, None);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (kind, offset, vaddr, filesz) = (elf.u32(ph)?, elf.u64(ph + 8)?, elf.u64(ph + 16)?, elf.u64(ph + 32)?);
        match kind {
            PT_LOAD => {
                let flags = elf.u32(ph + 4)?;
                if flags & 0b011 == 0b011 {
                    return Err("it has a segment that is both writable and executable".into());
                }
                elf.loads.push((vaddr, filesz, offset))
            }
            PT_INTERP => interp = Some((offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            _ => {}
        }
    }
    let (interp_off, interp_size) =
        interp.ok_or("it is statically linked (no PT_INTERP): zygote start needs a dynamically linked glibc binary")?;
    let interp = elf.slice(interp_off, interp_size)?;
    let interp = String::from_utf8_lossy(interp.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
    if interp != GLIBC_LOADER {
        return Err(format!("its loader is {interp:?}, not glibc's {GLIBC_LOADER:?}"));
    }
    let (dyn_off, dyn_size) = dynamic.ok_or("no PT_DYNAMIC segment")?;
    let mut tags = std::collections::HashMap::new();
    for i in 0..dyn_size / 16 {
        let tag = elf.u64(dyn_off + i * 16)?;
        if tag == DT_NULL {
            break;
        }
        let val = elf.u64(dyn_off + i * 16 + 8)?;
        match tag {
            DT_PREINIT_ARRAY | DT_PREINIT_ARRAYSZ => {
                return Err("it has a DT_PREINIT_ARRAY (code that runs before the libraries' constructors)".into())
            }
            DT_AUDIT | DT_DEPAUDIT => return Err("it names audit libraries (DT_AUDIT/DT_DEPAUDIT)".into()),
            DT_REL => return Err("it has DT_REL relocations (x86-64 binaries use DT_RELA)".into()),
            _ => {}
        }
        tags.insert(tag, val);
    }
    if tags.get(&DT_SYMENT).is_some_and(|&e| e != SYM_SIZE) {
        return Err("unexpected symbol entry size".into());
    }
    let symtab = match tags.get(&DT_SYMTAB) {
        Some(&addr) => Some(elf.offset(addr)?),
        None => None,
    };
    // Relocations: no IRELATIVE; note COPY targets; no reference to an IFUNC.
    let mut tables = Vec::new();
    if let (Some(&addr), Some(&size)) = (tags.get(&DT_RELA), tags.get(&DT_RELASZ)) {
        tables.push((addr, size));
    }
    if let (Some(&addr), Some(&size)) = (tags.get(&DT_JMPREL), tags.get(&DT_PLTRELSZ)) {
        if tags.get(&DT_PLTREL).is_some_and(|&k| k != DT_RELA) {
            return Err("its PLT relocations are not DT_RELA".into());
        }
        tables.push((addr, size));
    }
    // Address ranges that COPY relocations fill with a library's data.
    let mut copied = Vec::new();
    for (addr, size) in tables {
        let off = elf.offset(addr)?;
        for i in 0..size / RELA_SIZE {
            let info = elf.u64(off + i * RELA_SIZE + 8)?;
            let (kind, sym) = ((info & 0xffff_ffff) as u32, info >> 32);
            if kind == R_X86_64_IRELATIVE {
                return Err("it has an IRELATIVE relocation (an IFUNC resolver of its own runs before main)".into());
            }
            if sym == 0 {
                continue;
            }
            let symtab = symtab.ok_or("relocations name symbols but there is no DT_SYMTAB")?;
            let (st_info, shndx, name) = elf.sym_info(symtab, sym)?;
            if st_info & 0xf == STT_GNU_IFUNC && shndx != 0 {
                return Err(format!("a relocation names its own IFUNC symbol {name} (its resolver runs before main)"));
            }
            if kind == R_X86_64_COPY {
                let at = elf.u64(off + i * RELA_SIZE)?;
                let size = elf.u64(symtab + sym * SYM_SIZE + 16)?;
                copied.push((at, at.saturating_add(size)));
            }
        }
    }
    // Every symbol a library could look up: only copied data and `_IO_stdin_used`.
    let Some(symtab) = symtab else { return Ok(()) };
    let count = symbol_count(&elf, &tags)?;
    let strtab = match tags.get(&DT_STRTAB) {
        Some(&addr) => Some(elf.offset(addr)?),
        None => None,
    };
    for index in 1..count {
        let (st_info, shndx, name) = elf.sym_info(symtab, index)?;
        if shndx == 0 {
            continue;
        }
        let value = elf.u64(symtab + index * SYM_SIZE + 8)?;
        if st_info & 0xf == STT_OBJECT && copied.iter().any(|&(start, end)| value >= start && value < end) {
            continue;
        }
        let text = strtab.and_then(|s| symbol_name(&elf, s, symtab, index)).unwrap_or(name);
        if text == "_IO_stdin_used" && st_info & 0xf == STT_OBJECT {
            continue;
        }
        return Err(format!(
            "it exports symbol {text:?}, which a library constructor could call before main (built with -rdynamic, or replacing a library function such as malloc?)"
        ));
    }
    Ok(())
}

fn symbol_name(elf: &Elf, strtab: u64, symtab: u64, index: u64) -> Option<String> {
    let name = u64::from(elf.u32(symtab + index * SYM_SIZE).ok()?);
    let start = strtab.checked_add(name)? as usize;
    let rest = elf.bytes.get(start..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Number of dynamic symbols the loader can find by name: from `DT_HASH`'s chain
/// count, or by walking `DT_GNU_HASH`'s last chain.
fn symbol_count(elf: &Elf, tags: &std::collections::HashMap<u64, u64>) -> Result<u64, String> {
    let count = if let Some(&addr) = tags.get(&DT_HASH) {
        u64::from(elf.u32(elf.offset(addr)? + 4)?)
    } else if let Some(&addr) = tags.get(&DT_GNU_HASH) {
        let h = elf.offset(addr)?;
        let nbuckets = u64::from(elf.u32(h)?);
        let symoffset = u64::from(elf.u32(h + 4)?);
        let bloom_size = u64::from(elf.u32(h + 8)?);
        let buckets = h + 16 + bloom_size * 8;
        let chains = buckets + nbuckets * 4;
        let mut last = 0u64;
        for b in 0..nbuckets {
            last = last.max(u64::from(elf.u32(buckets + b * 4)?));
        }
        if last < symoffset {
            symoffset
        } else {
            let mut i = last;
            while elf.u32(chains + (i - symoffset) * 4)? & 1 == 0 {
                i += 1;
                if i > MAX_SYMBOLS {
                    return Err("unterminated GNU hash chain".into());
                }
            }
            i + 1
        }
    } else {
        return Err("no DT_HASH or DT_GNU_HASH table".into());
    };
    if count > MAX_SYMBOLS {
        return Err(format!("{count} dynamic symbols"));
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Vec<u8> {
        std::fs::read(crate::samples::path(name)).unwrap()
    }

    #[test]
    fn ordinary_glibc_binaries_qualify() {
        for name in ["hello_world", "probe", "hello_cpp", "python_hello"] {
            let path = crate::samples::path(name);
            if !path.exists() {
                eprintln!("SKIP {name}: sample not built");
                continue;
            }
            assert_eq!(check(&sample(name)), Ok(()), "{name}");
        }
    }

    #[test]
    fn unfit_binaries_are_refused_with_the_reason() {
        let err = check(&sample("hello_world_static")).unwrap_err();
        assert!(err.contains("statically linked"), "{err}");
        let err = check(&sample("hello_nolibc")).unwrap_err();
        assert!(err.contains("statically linked") || err.contains("loader"), "{err}");
        let err = check(&sample("zygote_ifunc")).unwrap_err();
        assert!(err.contains("IFUNC") || err.contains("IRELATIVE"), "{err}");
        let err = check(&sample("zygote_preinit")).unwrap_err();
        assert!(err.contains("DT_PREINIT_ARRAY"), "{err}");
        let err = check(&sample("zygote_malloc")).unwrap_err();
        assert!(err.contains("exports symbol"), "{err}");
        assert!(check(b"\x7fELF").is_err());
        let mut cut = sample("hello_world");
        cut.truncate(200);
        assert!(check(&cut).is_err());
    }
}
